import json

import pytest
import torch

from qforge.cli.main import main
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError


def test_quantize_then_eval_an_output_dir(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Every window is evaluated on its own. " * 80)
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--asym",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rtn W4 g32 asym" in printed and "bits/weight" in printed
    cfg = json.loads((out / "qforge_config.json").read_text())
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["sym"] is False
    js = tmp_path / "r.json"
    assert main(["-q", "eval", str(out), "--dataset", str(text), "--seqlen", "32", "--max-windows", "3",
                 "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert rows[0]["windows"] == 3 and rows[0]["seqlen"] == 32 and rows[0]["tokens"] == 96
    assert rows[0]["ppl"] > 1 and "perplexity of" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--bits", "9", "--out", str(tmp_path / "o")]) == 2
    assert "bits must be" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama_dir), "--dataset", "nonsense"]) == 2
    assert "unknown evaluation set" in capsys.readouterr().err
    for argv in (["eval", str(tiny_llama_dir), "--max-windows", "-1"], ["generate", str(tiny_llama_dir), "--prompt",
                 "x", "--max-new-tokens", "0"], ["stats", str(tiny_llama_dir), "--out", "s", "--nsamples", "0"]):
        with pytest.raises(SystemExit) as e:                     # argparse's usage error
            main(argv)
        assert e.value.code == 2 and "must be at least" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--device", "gpu", "--out", str(tmp_path / "o")]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:        # no abbreviations: not taken as --export-out gptq
        main(["quantize", str(tiny_llama_dir), "--export", "gptq", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "unrecognized arguments: --export" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--export-out", str(tmp_path / "p"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "name its --format" in capsys.readouterr().err       # refused before quantizing, not silently ignored
    missing = "cuda:64" if torch.cuda.is_available() else "cuda"
    assert main(["eval", str(tiny_llama_dir), "--device", missing]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gptq_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
                 "--act-order", "--damp", "0.02", "--calib", "builtin:wiki", "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "qforge_config.json").read_text())
    assert cfg["method"] == "gptq" and cfg["act_order"] and cfg["damp"] == 0.02
    calib = json.loads((out / "qforge_calibration.json").read_text())
    assert calib == {"source": "builtin:wiki", "nsamples": 4, "seqlen": 32, "seed": 0}
    samples = (out / "calibration.jsonl").read_text().splitlines()
    assert len(samples) == 4 and all(len(json.loads(s)["input_ids"]) == 32 for s in samples)
    record = json.loads((out / "run_record.json").read_text())
    assert any("small" in w for w in record["calibration_warnings"])
    assert record["seed"] == 0 and record["peak_rss_mb"] > 0


def test_a_preset_scheme_sets_the_quantization_options_and_given_options_win(tiny_llama_dir, wiki_excerpt, tmp_path,
                                                                              capsys):
    from qforge.config import SCHEMES

    assert QuantizeConfig.from_scheme("FP8_BLOCK", method="gptq") == QuantizeConfig(
        method="gptq", bits=8, group_size=128, fp8=True, fp8_block=True, act_bits=8)
    assert QuantizeConfig.from_scheme("W4A16_ASYM").sym is False and "W8A8" in SCHEMES
    with pytest.raises(QForgeError, match="unknown scheme 'W3A16'"):
        QuantizeConfig.from_scheme("W3A16")
    runs = {"w8a8": ["--scheme", "W8A8"],
            "block32": ["--scheme", "FP8_BLOCK", "--group-size", "32"],      # the tiny widths: tiles of 32
            "asym_given_sym": ["--scheme", "W4A16_ASYM", "--sym", "--group-size", "32"]}
    for name, args in runs.items():
        assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "rtn", *args, "--calib", wiki_excerpt,
                     "--nsamples", "2", "--calib-seqlen", "32", "--out", str(tmp_path / name)]) == 0
    cfg = {n: json.loads((tmp_path / n / "qforge_config.json").read_text()) for n in runs}
    assert (cfg["w8a8"]["bits"], cfg["w8a8"]["group_size"], cfg["w8a8"]["act_bits"], cfg["w8a8"]["fp8"]) == \
        (8, -1, 8, False)
    assert (cfg["block32"]["group_size"], cfg["block32"]["fp8_block"], cfg["block32"]["act_bits"]) == (32, True, 8)
    assert (cfg["asym_given_sym"]["bits"], cfg["asym_given_sym"]["sym"]) == (4, True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny_llama_dir), "--scheme", "W3A16", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'W3A16'" in capsys.readouterr().err
