import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qforge import QForgeError
from qforge.calibration import DOMAINS, build_calibration, builtin_documents, load_samples_jsonl
from qforge.calibration.checks import NARROW_JSD, jsd_bits, token_samples
from qforge.calibration.sources import _bounded
from qforge.eval import load_eval_text


def test_builtin_eval_and_calibration_are_disjoint_documents():
    for d in DOMAINS:
        calib, evals = builtin_documents(d, "calib"), builtin_documents(d, "eval")
        assert calib and evals
        assert not {i for i, _ in calib} & {i for i, _ in evals}
        h = lambda t: hashlib.sha1(t.encode()).hexdigest()  # noqa: E731
        assert not {h(t) for _, t in calib} & {h(t) for _, t in evals}
        for _, t in evals:  # no eval document is pasted inside a calibration document either
            assert all(t[:200] not in c for _, c in calib)


def test_mix_draws_equal_shares_from_every_domain(tiny_tokenizer):
    c = build_calibration("builtin:mix", tiny_tokenizer, nsamples=10, seqlen=64, seed=0)
    assert len(c) == 10 and all(len(s) == 64 for s in c.samples)
    counts = {d: c.domains.count(d) for d in DOMAINS}
    assert sorted(counts.values()) == [2, 2, 3, 3]
    assert sorted(c.domains[:4]) == sorted(DOMAINS)      # interleaved: any first k samples are mixed too
    assert not any("narrow" in w or "one domain" in w for w in c.warnings)


def test_sampling_is_deterministic_per_seed(tiny_tokenizer):
    a = build_calibration("builtin:wiki", tiny_tokenizer, nsamples=4, seqlen=32, seed=1)
    b = build_calibration("builtin:wiki", tiny_tokenizer, nsamples=4, seqlen=32, seed=1)
    c = build_calibration("builtin:wiki", tiny_tokenizer, nsamples=4, seqlen=32, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))
    assert not all(torch.equal(x, y) for x, y in zip(a.samples, c.samples))


def test_small_and_single_domain_sets_warn(tiny_tokenizer):
    c = build_calibration("builtin:news", tiny_tokenizer, nsamples=4, seqlen=32)
    assert any("small" in w for w in c.warnings)
    assert any("one domain" in w for w in c.warnings)


def test_unlabelled_narrow_text_warns_and_diverse_text_does_not(tmp_path, tiny_tokenizer):
    code = "\n\n".join(t for _, t in builtin_documents("code", "calib"))
    (tmp_path / "code.txt").write_text(code)
    c = build_calibration(str(tmp_path / "code.txt"), tiny_tokenizer, nsamples=64, seqlen=256)
    assert any("narrow" in w for w in c.warnings)
    rows = [json.dumps({"text": t}) for d in DOMAINS for _, t in builtin_documents(d, "calib")]
    (tmp_path / "mix.jsonl").write_text("\n".join(rows))
    c = build_calibration(str(tmp_path / "mix.jsonl"), tiny_tokenizer, nsamples=64, seqlen=256)
    assert not any("narrow" in w for w in c.warnings)


def test_jsd_bounds():
    from collections import Counter

    assert jsd_bits(Counter({1: 5, 2: 5}), Counter({1: 5, 2: 5})) == 0
    assert abs(jsd_bits(Counter({1: 1}), Counter({2: 1})) - 1.0) < 1e-12
    assert 0 < NARROW_JSD < 1


def test_jsonl_input_ids_are_used_verbatim(tmp_path, tiny_tokenizer):
    rows = [[5, 6, 7], [1, 2, 3, 4], [9] * 10]
    p = tmp_path / "ids.jsonl"
    p.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows) + "\n")
    c = build_calibration(str(p), tiny_tokenizer, nsamples=2, seqlen=2048)
    assert [s.tolist() for s in c.samples] == rows[:2]
    assert [s.tolist() for s in load_samples_jsonl(p)] == rows


def test_txt_jsonl_text_and_parquet_sources_agree(tmp_path, tiny_tokenizer):
    text = "\n\n".join(t for _, t in builtin_documents("news", "calib"))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    pq.write_table(pa.table({"text": [text]}), tmp_path / "a.parquet")
    sets = [build_calibration(str(tmp_path / f"a.{ext}"), tiny_tokenizer, 8, 64, seed=3)
            for ext in ("txt", "jsonl", "parquet")]
    for other in sets[1:]:
        assert all(torch.equal(x, y) for x, y in zip(sets[0].samples, other.samples))


def test_labelled_jsonl_domains_take_equal_shares_as_the_builtin_ones_do(tmp_path, tiny_tokenizer):
    docs = {d: [t[:3000] for _, t in builtin_documents(d, "calib")[:6]] for d in ("news", "code")}
    lines = [json.dumps({"text": t, "domain": d}) for d in docs for t in docs[d]]
    (tmp_path / "two.jsonl").write_text("\n".join(lines) + "\n")
    calib = build_calibration(str(tmp_path / "two.jsonl"), tiny_tokenizer, 6, 32)
    assert calib.domains == ["code", "news"] * 3 and not any("narrow" in w for w in calib.warnings)
    # one label: the one-domain warning; the same documents drawn as the built-in domain draws them
    news = "\n".join(json.dumps({"text": t, "domain": "news"}) for _, t in builtin_documents("news", "calib"))
    (tmp_path / "news.jsonl").write_text(news)
    got, want = (build_calibration(spec, tiny_tokenizer, 4, 32, seed=5) for spec in (str(tmp_path / "news.jsonl"),
                                                                                       "builtin:news"))
    assert all(torch.equal(x, y) for x, y in zip(got.samples, want.samples)) and got.domains == want.domains
    assert any("one domain only (news)" in w for w in got.warnings)


def test_a_large_domain_is_drawn_from_a_seeded_selection_of_its_documents(tmp_path, tiny_tokenizer):
    docs = [t for _, t in builtin_documents("news", "calib") if t.strip()]
    (tmp_path / "news.jsonl").write_text("".join(json.dumps({"text": t, "domain": "news"}) + "\n" for t in docs))
    seen = []

    class Recording:                                   # the tiny tokenizer, remembering what it was given
        def __len__(self):
            return len(tiny_tokenizer)

        def __call__(self, text, **kw):
            seen.append(text)
            return tiny_tokenizer(text, **kw)

    def draw(spec, limit, seed=0):
        seen.clear()
        return build_calibration(str(tmp_path / spec), Recording(), 4, 32, seed=seed, max_domain_chars=limit)

    total = sum(map(len, docs))
    whole = draw("news.jsonl", total)
    assert seen == ["\n\n".join(docs)]                # at the limit: the whole domain, as the default draws it
    assert all(torch.equal(x, y) for x, y in zip(whole.samples, draw("news.jsonl", 10**9).samples))
    cut = draw("news.jsonl", 20_000)
    text = seen[0]
    picked = [t for t in docs if t in text]
    assert 20_000 <= len(text) < 20_000 + max(map(len, docs)) + 2 * len(docs) and len(picked) < len(docs) / 2
    assert text == "\n\n".join(picked)                 # whole documents, in their order
    assert all(torch.equal(x, y) for x, y in zip(cut.samples, draw("news.jsonl", 20_000).samples))   # seeded
    draw("news.jsonl", 20_000, seed=1)
    assert seen[0] != text and len(cut.samples) == 4
    one = "\n\n".join(docs)                            # one document (a .txt file): a span of it
    span = _bounded([one], 20_000, random.Random(0))
    assert len(span) == 1 and len(span[0]) == 20_000 and span[0] in one


@pytest.mark.parametrize("content,name,match", [
    ("", "e.txt", "empty"),
    ("   \n", "e.jsonl", "empty"),
    ('{"input_ids": [1, 2]}\n{"oops"\n', "bad.jsonl", "not valid JSON"),
    ('{"input_ids": []}\n', "bad2.jsonl", "non-empty list"),
    ('{"input_ids": [1]}\n{"text": "x"}\n', "mixed.jsonl", "mixes"),
    ('{"text": "x", "domain": 3}\n', "label.jsonl", "'domain' must be a non-empty string"),
    ('{"input_ids": [1, 2]}\n{"input_ids": [5]}\n', "short.jsonl", "sample 1: 1 token"),
    ("x", "data.csv", "unsupported file type"),
    (b"\xff\xfe\x00garbage", "bin.txt", "could not read"),
    (b"not a parquet file", "x.parquet", "could not read"),
])
def test_bad_calibration_files_give_clear_errors(tmp_path, tiny_tokenizer, content, name, match):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(QForgeError, match=match):
        build_calibration(str(p), tiny_tokenizer, 4, 16)


def test_missing_source_and_unknown_builtin(tiny_tokenizer):
    with pytest.raises(QForgeError, match="no such file"):
        build_calibration("nope/missing.txt", tiny_tokenizer, 4, 16)
    with pytest.raises(QForgeError, match="unknown built-in"):
        build_calibration("builtin:poetry", tiny_tokenizer, 4, 16)


def test_parquet_without_text_column(tmp_path, tiny_tokenizer):
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    with pytest.raises(QForgeError, match="'text' column"):
        build_calibration(str(tmp_path / "x.parquet"), tiny_tokenizer, 4, 16)


def test_token_ids_beyond_vocab_are_rejected(tmp_path, tiny_tokenizer):
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [1, 10**6]}) + "\n")
    with pytest.raises(QForgeError, match=r"ids.jsonl: calibration sample 0: token ids outside \[0, "):
        build_calibration(str(tmp_path / "ids.jsonl"), tiny_tokenizer, 4, 16)


def test_tensor_samples_are_checked():
    rows = token_samples([torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([[4, 5], [6, 7]])], vocab=8)
    assert [r.tolist() for r in rows] == [[1, 2, 3], [4, 5], [6, 7]] and all(r.dtype == torch.long for r in rows)
    for bad, match in [([torch.rand(4)], "integer tensor"), ([[1, 2]], "integer tensor"),
                       ([torch.zeros(1, 1, 4, dtype=torch.long)], "1-D"), ([torch.tensor([3])], "at least 2"),
                       ([torch.tensor([1, 8])], r"outside \[0, 8\)"), ([torch.tensor([-1, 2])], "outside")]:
        with pytest.raises(QForgeError, match=match):
            token_samples(bad, vocab=8)


def test_eval_sets_load_and_unknown_names_fail():
    for d in DOMAINS:
        assert len(load_eval_text(d)) > 50_000
    with pytest.raises(QForgeError, match="unknown evaluation set"):
        load_eval_text("wikitext")


def test_cli_and_api_calibration_defaults_are_the_configs():
    # one place decides the default calibration (CalibrationConfig); the CLI and QModel.quantize read it
    import inspect

    from qforge.api import QModel
    from qforge.cli.main import build_parser
    from qforge.config import CalibrationConfig

    c = CalibrationConfig()
    want = (c.source, c.nsamples, c.seqlen)
    for cmd in (["quantize", "m", "--out", "o"], ["measure", "m", "--out", "o.json"], ["demo"]):
        a = build_parser().parse_args(cmd)
        assert (a.calib, a.nsamples, a.calib_seqlen) == want, cmd
    sig = inspect.signature(QModel.quantize).parameters
    assert (sig["calibration"].default, sig["nsamples"].default, sig["seqlen"].default) == want
