"""Results table, CSV, Pareto front and plot from synthetic run folders."""
import csv
import json
import struct
import zlib

import pytest

from sparsequant.eval import report as rp
from sparsequant.eval.report import ReportError

EVAL = {"data": "wikipedia", "seq_len": 1024, "windows": 20}


def _size(bpw, model_ratio):
    return {"compressed_params": 1000, "compressed_bytes": int(bpw * 125), "other_params": 10, "other_bytes": 20,
            "bits_per_weight": bpw, "linear_ratio_vs_fp16": bpw / 16, "total_bytes": 0,
            "model_ratio_vs_fp16": model_ratio}


def _checkpoint(root, name, recipe, bpw, ratio, ppl, tasks=None, dense_ppl=20.0, run_json=True):
    d = root / name
    d.mkdir(parents=True)
    (d / "sparsequant.json").write_text(json.dumps({
        "format": "sparsequant", "format_version": 1, "recipe": recipe, "size": _size(bpw, ratio),
        "run": {"dense_ppl": dense_ppl, "compressed_ppl": ppl, "eval": EVAL}}))
    if run_json:
        (d / "run.json").write_text(json.dumps({"model": "default", "recipe": recipe, "dense_ppl": dense_ppl,
                                                "compressed_ppl": ppl, "eval": EVAL, "size": _size(bpw, ratio)}))
    if tasks is not None:
        (d / "eval.json").write_text(json.dumps({"model": str(d), "tasks": {
            t: {"acc": a, "acc_stderr": 0.01, "acc_norm": a + 0.05, "acc_norm_stderr": 0.01, "n": 100}
            for t, a in tasks.items()}}))
    return d


Q4 = {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}
G2 = {"method": "gptq", "bits": 2, "group_size": 64, "symmetric": True}
FOUR = dict(arc_challenge=0.25, arc_easy=0.50, piqa=0.65, winogrande=0.52)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    _checkpoint(root, "a_int4", {"method": "magnitude", "pattern": "dense", "quant": Q4}, 4.125, 0.36, 24.0, FOUR)
    _checkpoint(root, "b_24_int4", {"method": "wanda", "pattern": "2:4", "quant": Q4}, 3.125, 0.29, 240.0,
                dict(arc_challenge=0.21, arc_easy=0.40, piqa=0.58, winogrande=0.50))
    _checkpoint(root, "c_50_int4", {"method": "sparsegpt", "pattern": "50%", "quant": Q4, "skip": ["*.0.*"]},
                3.2, 0.30, 60.0, dict(arc_challenge=0.22, arc_easy=0.45, piqa=0.61))  # no winogrande
    _checkpoint(root, "d_2bit", {"method": "magnitude", "pattern": "dense", "quant": G2}, 2.25, 0.25, 300.0,
                run_json=False)
    return root


def test_table_contents(runs):
    rows, notes = rp.collect([runs])
    by_run = {r.run: r for r in rows}
    assert rows[0].is_dense and rows[0].pruning == "Dense" and rows[0].ppl == 20.0  # from the run logs
    assert rp.table_cells(by_run["a_int4"]) == ["RTN g128", "-", "4", "-", "0.360", "25.0", "50.0", "65.0", "52.0",
                                                "48.0", "24.00"]
    b = by_run["b_24_int4"]
    assert (b.pruning, b.sparsity, b.bitwidth) == ("Wanda", "2:4", 4)
    assert b.average == pytest.approx((21 + 40 + 58 + 50) / 4)
    c = by_run["c_50_int4"]
    assert c.sparsity == "Unstructured 50% (some layers dense)" and c.average is None  # three tasks only
    assert rp.table_cells(c)[5:] == ["22.0", "45.0", "61.0", "-", "-", "60.00"]
    d = by_run["d_2bit"]
    assert (d.quantization, d.bitwidth, d.compression_ratio, d.model) == ("GPTQ g64", 2, 0.25, None)
    assert "perplexity on wikipedia, 20 x 1024 tokens" in notes
    md = rp.markdown(rows).splitlines()
    assert [c.strip() for c in md[0].split("|")[1:-1]] == rp.HEADERS
    assert len(md) == 2 + 5


def test_acc_norm_metric_and_eval_json_ppl_wins(runs):
    (runs / "a_int4" / "eval.json").write_text(json.dumps({
        "model": "x", "ppl": {"value": 23.5, "data": "wikipedia", "seq_len": 512, "windows": 8},
        "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.55}, "winogrande": {"acc": 0.52}}}))
    rows, notes = rp.collect([runs / "a_int4"], metric="acc_norm")
    a = next(r for r in rows if r.run == "a_int4")
    assert a.ppl == 23.5 and a.accuracy == {"arc_easy": pytest.approx(55.0), "winogrande": pytest.approx(52.0)}
    assert any("winogrande: no acc_norm, acc used" in n for n in notes)
    # The dense ppl logged at compress time was measured on another setting than eval.json's.
    assert any("different settings" in n for n in notes)


def test_csv_parses_back(runs, tmp_path):
    rows, _ = rp.collect([runs])
    path = rp.write_csv(rows, tmp_path / "r.csv")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["Run"] for t in table] == ["dense (from run logs)", "a_int4", "b_24_int4", "c_50_int4", "d_2bit"]
    a = table[1]
    assert float(a["Compression Ratio"]) == 0.36 and float(a["Average"]) == 48.0 and float(a["PPL"]) == 24.0
    assert float(a["Bits per weight"]) == 4.125
    assert table[3]["Wino"] == "" and table[3]["Average"] == ""  # missing = empty cell
    assert list(table[0])[:11] == rp.HEADERS


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    assert b"IEND" in data[-12:]
    return struct.unpack(">II", data[16:24]), len(data)


def test_report_files_and_plot(runs, tmp_path):
    files = rp.write_report([runs], tmp_path / "out")
    (w, h), nbytes = _png_size(files["plot"])
    assert w >= 1500 and h >= 700 and nbytes > 40_000  # two panels with text, not a blank canvas
    md = files["markdown"].read_text()
    assert "| Quantization | Pruning" in md and "pareto.png" in md
    # Perplexity, by bits: 2-bit (2.25, 300), wanda 2:4 (3.125, 240), sparsegpt 50% (3.2, 60), int4 (4.125, 24),
    # dense (16, 20): each is better than everything cheaper, so all five are on the front.
    assert "Pareto front (ppl against bits per weight): gptq int2 g64, wanda 2:4 + rtn int4 g128, " \
           "sparsegpt 50%* + rtn int4 g128, rtn int4 g128, dense fp16" in md
    # Accuracy front: only rows with all four tasks (a_int4, b_24_int4) take part.
    assert "Pareto front (accuracy against bits per weight): wanda 2:4 + rtn int4 g128, rtn int4 g128" in md


def test_pareto_front_hand_made():
    #        bits   ppl
    pts = [(16.0, 10.0),   # 0 front: the best ppl
           (4.0, 12.0),    # 1 front
           (4.0, 13.0),    # 2 dominated by 1 (same bits, worse)
           (3.0, 30.0),    # 3 front
           (3.5, 40.0),    # 4 dominated by 3 (more bits, worse)
           (9.0, 12.0),    # 5 dominated by 1 (more bits, same ppl)
           (2.0, 100.0)]   # 6 front: the fewest bits
    xs, ys = zip(*pts)
    assert rp.pareto_front(xs, ys, higher_is_better=False) == [6, 3, 1, 0]
    acc = [60, 55, 50, 45, 50, 58, 30]  # higher is better
    # 4 (3.5 bits, 50) joins this front: nothing with <= 3.5 bits reaches 50.
    assert rp.pareto_front(xs, acc, higher_is_better=True) == [6, 3, 4, 1, 5, 0]
    assert rp.pareto_front([1, 1], [5, 5], True) == [0, 1]  # identical points dominate neither


def test_accuracy_matrix_json(tmp_path):
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps({"evaluation": "20 x 1024 tokens", "rows": [
        {"method": "dense", "pattern": "dense", "quant": "none", "ppl": 18.0, "bits_per_weight": 16.0,
         "linear_ratio": 1.0, "model_ratio": 1.0},
        {"method": "wanda", "pattern": "2:4", "quant": "int4", "ppl": 200.0, "bits_per_weight": 3.139,
         "linear_ratio": 0.196, "model_ratio": 0.41},
        {"method": "-", "pattern": "dense", "quant": "int2-gptq-g64", "ppl": 90.0, "bits_per_weight": 2.25,
         "linear_ratio": 0.14, "model_ratio": 0.33},
        {"method": "magnitude", "pattern": "50%", "quant": "none", "ppl": 150.0, "bits_per_weight": 9.0,
         "linear_ratio": 0.56, "model_ratio": 0.7}]}))
    rows, _ = rp.collect([path])
    cells = {r.run: rp.table_cells(r) for r in rows}
    assert cells["dense/dense/none"][:5] == ["-", "Dense", "16", "-", "1.000"]
    assert cells["wanda/2:4/int4"][:5] == ["RTN g128", "Wanda", "4", "2:4", "0.410"]
    assert cells["-/dense/int2-gptq-g64"][:4] == ["GPTQ g64", "-", "2", "-"]
    assert cells["magnitude/50%/none"][:4] == ["-", "Magnitude", "16", "Unstructured 50%"]
    files = rp.write_report([path], tmp_path / "out")
    (w, _h), nbytes = _png_size(files["plot"])
    assert nbytes > 20_000 and w >= 900  # one panel: no zero-shot results in a matrix file
    assert "dense fp16" in files["markdown"].read_text()


def test_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        rp.collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="holds no run folder"):
        rp.collect([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        rp.collect([bad])
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ReportError, match="no 'rows' list"):
        rp.collect([other])
    with pytest.raises(ReportError, match="acc or acc_norm"):
        rp.collect([other], metric="f1")


def test_report_command(runs, tmp_path, capsys):
    import argparse

    from sparsequant.commands import report

    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["report", str(runs), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| Quantization" in out and "pareto.png" in out
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"results.md", "results.csv", "pareto.png"}


def test_repeated_dense_rows_kept_once(tmp_path):
    import json

    from sparsequant.eval.report import collect

    files = []
    for i, extra in enumerate([{"method": "wanda", "pattern": "2:4", "quant": "none", "ppl": 50.0},
                               {"method": "sparsegpt", "pattern": "2:4", "quant": "int4", "joint": True, "ppl": 40.0}]):
        f = tmp_path / f"m{i}.json"
        dense = {"method": "dense", "pattern": "dense", "quant": "none", "ppl": 20.0, "bits_per_weight": 16.0,
                 "linear_ratio": 1.0, "model_ratio": 1.0}
        extra.update(bits_per_weight=9.0, linear_ratio=0.56, model_ratio=0.65)
        f.write_text(json.dumps({"evaluation": "same", "rows": [dense, extra]}))
        files.append(f)
    rows, _ = collect(files)
    assert sum(r.is_dense for r in rows) == 1 and len(rows) == 3
    assert rows[2].quantization.startswith("joint")


def test_recovery_and_overrides_are_named_in_the_row():
    base = {"method": "sparsegpt", "pattern": "2:4", "joint": True,
            "quant": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}}
    plain = rp._row_from_recipe(base, "a", "x")
    assert plain.pruning == "SparseGPT" and plain.sparsity == "2:4"
    slim = rp._row_from_recipe({**base, "adapter": {"rank": 0.1, "bits": 4}}, "b", "x")
    assert slim.pruning == "SparseGPT + SLiM r0.1 int4"
    assert rp._label(slim) == "sparsegpt 2:4 + joint int4 g128 + SLiM r0.1 int4"
    vcft = rp._row_from_recipe({**base, "recovery": {"variance_correction": True, "finetune_steps": 200}}, "c", "x")
    assert vcft.pruning == "SparseGPT + VC + FT200"
    sel = rp._row_from_recipe({**base, "overrides": [{"match": "model.layers.0.*", "pattern": "dense"}]}, "d", "x")
    assert sel.sparsity == "2:4 (some layers dense)" and rp._label(sel).startswith("sparsegpt 2:4* ")


def test_off_scale_perplexities_are_clipped_for_display_only():
    assert rp.display_cap([25.0, 80.0, 1000.0], log_y=True) is None
    cap = rp.display_cap([25.0, 80.0, 6e6], log_y=True)
    assert cap == pytest.approx(25.0 * 10**rp.MAX_DECADES)
    assert rp.display_cap([25.0, 6e6], log_y=False) is None
    # the front is decided on the true values: 2-bit at 4e5 beats 6e6 with more bits, so stays on it
    assert rp.pareto_front([2.25, 3.0, 16.0], [6e6, 4e5, 25.0], higher_is_better=False) == [0, 1, 2]
