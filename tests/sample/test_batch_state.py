"""SamplingBatch stays consistent with a plain host model under random add / remove / append (hypothesis)."""

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blocks.sample.batch import SamplingBatch
from blocks.sample.params import SamplingParams

V, MAX_ROWS, MAX_LEN = 23, 5, 40


class BatchMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.batch = SamplingBatch(max_num_rows=MAX_ROWS, vocab_size=V, max_len=MAX_LEN)
        self.model: dict[str, dict] = {}  # req_id -> {"params", "prompt", "output"}
        self.next_id = 0

    @precondition(lambda self: len(self.model) < MAX_ROWS)
    @rule(
        prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=6),
        output=st.lists(st.integers(0, V - 1), max_size=4),
        temperature=st.sampled_from([0.0, 0.5, 1.0]),
        top_k=st.integers(0, 30),
        freq=st.sampled_from([0.0, 0.5, -1.0]),
        seed=st.one_of(st.none(), st.integers(0, 100)),
    )
    def add(self, prompt, output, temperature, top_k, freq, seed):
        rid = f"q{self.next_id}"
        self.next_id += 1
        params = SamplingParams(temperature=temperature, top_k=top_k, frequency_penalty=freq, seed=seed)
        self.batch.add_request(rid, params, prompt, output_token_ids=output)
        self.model[rid] = {"params": params, "prompt": prompt, "output": list(output)}

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def remove(self, data):
        rid = data.draw(st.sampled_from(sorted(self.model)))
        self.batch.remove_request(rid)
        del self.model[rid]

    @precondition(lambda self: len(self.model) > 0 and all(
        len(m["prompt"]) + len(m["output"]) < MAX_LEN for m in self.model.values()))
    @rule(data=st.data())
    def append(self, data):
        toks = [data.draw(st.integers(0, V - 1)) for _ in range(self.batch.num_rows)]
        if data.draw(st.booleans()):
            self.batch.append_tokens(torch.tensor(toks))
        else:  # the engine's order: the device half before the host reads the ids, then the host half
            self.batch.record_tokens_on_device(torch.tensor(toks))
            self.batch.record_tokens_on_host(torch.tensor(toks), toks)
        for rid, tok in zip(self.batch.req_ids, toks):
            self.model[rid]["output"].append(tok)

    @invariant()
    def rows_match_the_model(self):
        b = self.batch
        assert sorted(b.req_ids) == sorted(self.model)
        bt = b.prepare()
        for row, rid in enumerate(b.req_ids):
            assert b.row_of(rid) == row
            m = self.model[rid]
            tokens = m["prompt"] + m["output"]
            assert int(b.num_tokens[row]) == len(tokens) and int(b.num_output[row]) == len(m["output"])
            assert float(bt.temperature[row]) == m["params"].temperature
            assert int(bt.top_k[row]) == m["params"].top_k
            assert float(bt.frequency_penalty[row]) == m["params"].frequency_penalty
            if not b._has_penalty(m["params"]):
                continue  # only penalties read the token tensors: a row without one may hold stale ids
            assert b.token_ids[row, : len(tokens)].tolist() == tokens
            assert set(b.token_ids[row].tolist()) <= set(tokens), "padding must repeat the row's tokens"
            if b.output_counts is not None:
                ref = torch.bincount(torch.tensor(m["output"], dtype=torch.int64), minlength=V)
                assert torch.equal(b.output_counts[row], ref.to(torch.int32))
            assert (b.rngs[row] is not None) == (m["params"].seed is not None and m["params"].temperature > 0)


TestBatchMachine = BatchMachine.TestCase
TestBatchMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
