import json

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.checkpoint import QUANT_FILE, check_layers_match, load_layers
from qforge.utils.atomic import atomic_dir


def test_save_load_round_trip(tiny_llama_dir, tmp_path):
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(bits=3, group_size=24, sym=False))
    m.quantize()
    out = m.save(tmp_path / "q")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", QUANT_FILE, "qforge_config.json", "run_record.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
    record = json.loads((out / "run_record.json").read_text())
    assert record["ragged_layers"]  # 64 and 96 wide inputs are not multiples of 24
    assert record["storage"]["bits_per_weight"] > 3
    assert record["versions"]["torch"] == torch.__version__

    back = qforge.load(str(out))
    assert back.quantized and back.config == m.config
    assert set(back.result.layers) == set(m.result.layers)
    for name, q in m.result.layers.items():
        b = back.result.layers[name]
        assert torch.equal(q.codes, b.codes) and torch.equal(q.scales, b.scales) and torch.equal(q.g_idx, b.g_idx)
    check_layers_match(back.result.layers, back.model)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(m.model(input_ids=x).logits, back.model(input_ids=x).logits)


def test_tampered_output_is_detected(tiny_llama_dir, tmp_path):
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(bits=4, group_size=32))
    m.quantize()
    out = m.save(tmp_path / "q")
    layers = load_layers(out / QUANT_FILE)
    name = next(iter(layers))
    layers[name].codes[0, 0] ^= 1
    with pytest.raises(QForgeError, match="disagree"):
        check_layers_match(layers, qforge.load(str(out)).model)
    (out / QUANT_FILE).write_bytes(b"junk")
    with pytest.raises(QForgeError, match="corrupt"):
        qforge.load(str(out))


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path):
    (tmp_path / "q").mkdir()
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig())
    m.quantize()
    with pytest.raises(QForgeError, match="already exists"):
        m.save(tmp_path / "q")
    m.save(tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "qforge_config.json").is_file()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", overwrite=True):
            raise RuntimeError("crash")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_evaluating_an_output_dir_matches_the_in_memory_model(tiny_llama_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("Calibration and evaluation are different things. " * 60)
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(bits=4, group_size=32))
    m.quantize()
    out = m.save(tmp_path / "q")
    a = qforge.evaluate(m, datasets=[str(text)], seqlen=32)
    b = qforge.evaluate(str(out), datasets=[str(text)], seqlen=32)
    assert a[0]["ppl"] == pytest.approx(b[0]["ppl"], rel=1e-6)
    base = qforge.evaluate(str(tiny_llama_dir), datasets=[str(text)], seqlen=32)
    assert base[0]["ppl"] != a[0]["ppl"]


def test_shard_sizes_are_read_as_transformers_writes_them():
    from qforge.utils.shards import parse_size

    assert parse_size("4GB") == 4 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size("1.5 GB") == 15 * 10**8 and parse_size(123) == parse_size("123") == 123
    for bad in ("0", "-1GB", "4 lots", "GB", True, 0):
        with pytest.raises(QForgeError, match="shard size"):
            parse_size(bad)


def test_shard_writer_fills_shards_in_order_up_to_the_limit(tmp_path):
    from safetensors.torch import load_file

    from qforge.utils.shards import INDEX, ShardWriter

    state = {f"t{i}": torch.full((n,), float(i)) for i, n in enumerate([10, 10, 10, 40, 5, 5])}   # fp32: 4 B each
    w = ShardWriter(tmp_path, max_bytes=80)
    w.write(dict(list(state.items())[:2]))
    w.write(dict(list(state.items())[2:]))
    names = w.finish()
    shards = [list(load_file(str(tmp_path / n))) for n in names]
    assert shards == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]          # t3 (160 B) alone, over the limit
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 4 * 80 and index["weight_map"]["t4"] == names[3]
    assert names[0] == "model-00001-of-00004.safetensors" and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(names + [INDEX])
    one = tmp_path / "one"
    one.mkdir()
    w = ShardWriter(one)
    w.write({"a": torch.ones(3)})
    assert w.finish() == ["model.safetensors"] and not (one / INDEX).exists()
    with pytest.raises(QForgeError, match="no tensors"):
        ShardWriter(one).finish()
