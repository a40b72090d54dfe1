"""Beam search block against transformers' beam search on a tiny random Llama (fixed logit sequences)."""

import pytest
import torch

from blocks.sample.beam_search import BeamSearch
from blocks.sample.params import BeamSearchParams

transformers = pytest.importorskip("transformers")

VOCAB, EOS, PAD = 37, 3, 0


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.6,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses end on it
        model.lm_head.weight[EOS] *= 2.5
    return model


def _run_ours(model, prompt, params):
    search = BeamSearch(params, eos_token_ids=[EOS])
    slots_tokens = {0: list(prompt)}
    steps = 0
    while not search.done:
        rows = [slots_tokens[b.slot] for b in search.running]
        with torch.no_grad():
            logits = model(torch.tensor(rows)).logits[:, -1].float()
        out = search.step(torch.log_softmax(logits, dim=-1))
        # Apply the KV plan to the per-slot token lists exactly as an engine would to block tables.
        for slot in out.freed_slots:
            del slots_tokens[slot]
        for src, dst in out.forks:
            assert dst not in slots_tokens, "fork into a live slot"
            slots_tokens[dst] = list(slots_tokens[src])
        for slot, tok in zip(out.slots, out.token_ids):
            slots_tokens[slot].append(tok)
        assert len(set(out.slots)) == len(out.slots) <= params.beam_width
        for beam in search.running:
            assert slots_tokens[beam.slot] == list(prompt) + list(beam.token_ids)
        steps += 1
    return search.best()


def _run_hf(model, prompt, params):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=params.beam_width,
            num_return_sequences=params.beam_width,
            max_new_tokens=params.max_tokens,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    hyps = []
    for seq, score in zip(out.sequences[:, len(prompt) :].tolist(), out.sequences_scores.tolist()):
        if EOS in seq:  # after EOS, HF pads; a hypothesis without EOS has exactly max_tokens tokens
            seq = seq[: seq.index(EOS) + 1]
        hyps.append((tuple(seq), score))
    return hyps


@pytest.mark.parametrize(
    "width,length_penalty,early_stopping,max_tokens",
    [(2, 1.0, False, 9), (6, 1.0, False, 7), (3, 0.5, True, 8), (4, 2.0, "never", 10), (5, -0.7, False, 6)],
)
def test_beam_search_matches_transformers(tiny_llama, width, length_penalty, early_stopping, max_tokens):
    gen = torch.Generator().manual_seed(width * 7 + max_tokens)
    num_eos_finished = 0
    for _ in range(3):
        prompt = torch.randint(4, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        params = BeamSearchParams(
            beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping
        )
        ours = _run_ours(tiny_llama, prompt, params)
        theirs = _run_hf(tiny_llama, prompt, params)
        assert [h.token_ids for h in ours] == [t for t, _ in theirs]
        torch.testing.assert_close(
            torch.tensor([h.score for h in ours]), torch.tensor([s for _, s in theirs]), rtol=1e-4, atol=1e-4
        )
        num_eos_finished += sum(h.finished_on_eos for h in ours)
    if width > 1:
        assert num_eos_finished > 0, "the test model never produced EOS: the EOS path is untested"


def _fixed_logprobs(search, gen_seed, vocab=29, scale=0.7):
    rows = []
    for b in search.running:
        seed = hash((gen_seed,) + b.token_ids) % (2**31)
        rows.append(torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale, -1))
    return torch.stack(rows)


def test_stochastic_beams_are_seeded_and_respect_the_filters():
    def run(seed):
        params = BeamSearchParams(beam_width=3, max_tokens=6, temperature=1.5, top_k=4, top_p=0.9, seed=seed)
        search = BeamSearch(params, eos_token_ids=[EOS])
        while not search.done:
            lp = _fixed_logprobs(search, 0)
            allowed = [set(row.topk(4).indices.tolist()) for row in lp]
            parents = list(search.running)
            out = search.step(lp)
            for parent, tok in zip(out.parent_beams, out.token_ids):
                assert tok in allowed[parent], "a token outside the parent's top-k was chosen"
            for hyp in out.finished:
                assert hyp.token_ids[:-1] in {p.token_ids for p in parents}
        return [(h.token_ids, round(h.score, 5)) for h in search.best()]

    assert run(1) == run(1)
    assert len({tuple(run(seed)) for seed in range(1, 5)}) > 1, "the seed does not change the beams"


def test_deterministic_beam_search_rejects_bad_steps():
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=1), eos_token_ids=[EOS])
    with pytest.raises(ValueError, match="num_beams=1"):
        search.step(torch.randn(2, 10))
    out = search.step(torch.log_softmax(torch.randn(1, 10), -1))
    assert out.done and len(search.best()) == 2 and out.freed_slots == [0]
    with pytest.raises(ValueError, match="done"):
        search.step(torch.randn(1, 10))
