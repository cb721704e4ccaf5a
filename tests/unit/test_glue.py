"""GLUE metrics against hand-computed values, and the TSV readers on each task's original layout. No torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from training.glue import TASKS, Example, GlueDataError, compute_metrics, get_task, read_split

GLUE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"

try:
    from scipy import stats as _stats
except ImportError:  # scipy is a dev extra; the hand values below stand on their own
    _stats = None


def _from_confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.array([1] * tp + [0] * tn + [1] * fp + [0] * fn)
    gold = np.array([1] * tp + [0] * tn + [0] * fp + [1] * fn)
    return pred, gold


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_accuracy_sst2():
    m = compute_metrics(TASKS["SST-2"], np.array([1, 0, 1, 1, 0]), np.array([1, 0, 0, 1, 1]))
    assert m == {"accuracy": pytest.approx(3 / 5)}


@pytest.mark.parametrize("task", ["RTE", "WNLI"])
def test_accuracy_only_tasks(task):
    m = compute_metrics(TASKS[task], np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    assert m == {"accuracy": pytest.approx(0.75)}


def test_mrpc_f1():
    # pred 1 1 0 1 0 0 1 1
    # gold 1 0 0 1 1 0 1 0   -> tp=3, fp=2, fn=1, tn=2
    # precision 3/5, recall 3/4, F1 = 2*(3/5)*(3/4)/(3/5+3/4) = 2/3; accuracy 5/8
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 1])
    gold = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    m = compute_metrics(TASKS["MRPC"], pred, gold)
    assert set(m) == {"accuracy", "f1"}
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_mrpc_f1_is_zero_without_true_positives():
    m = compute_metrics(TASKS["MRPC"], np.array([0, 0, 1]), np.array([1, 0, 0]))
    assert m["f1"] == 0.0 and m["accuracy"] == pytest.approx(1 / 3)


def test_cola_mcc():
    # confusion matrix: tp=6, tn=3, fp=1, fn=2 (n=12)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    #     = (18 - 2) / sqrt(7 * 8 * 4 * 5) = 16 / sqrt(1120) = 0.478091443...
    pred, gold = _from_confusion(tp=6, tn=3, fp=1, fn=2)
    m = compute_metrics(TASKS["CoLA"], pred, gold)
    assert set(m) == {"mcc", "accuracy"}
    assert m["mcc"] == pytest.approx(16 / math.sqrt(1120))
    assert m["mcc"] == pytest.approx(0.4780914437, abs=1e-9)
    assert m["accuracy"] == pytest.approx(9 / 12)
    # order of examples does not matter
    perm = np.random.default_rng(0).permutation(len(pred))
    assert compute_metrics(TASKS["CoLA"], pred[perm], gold[perm])["mcc"] == pytest.approx(m["mcc"])


def test_cola_mcc_extremes():
    gold = np.array([1, 0, 1, 1, 0])
    assert compute_metrics(TASKS["CoLA"], gold, gold)["mcc"] == pytest.approx(1.0)
    assert compute_metrics(TASKS["CoLA"], 1 - gold, gold)["mcc"] == pytest.approx(-1.0)


@pytest.mark.parametrize("constant", [0, 1])
def test_cola_mcc_zero_when_a_class_is_never_predicted(constant):
    gold = np.array([1, 0, 1, 1, 0, 1])
    pred = np.full_like(gold, constant)
    m = compute_metrics(TASKS["CoLA"], pred, gold)
    assert m["mcc"] == 0.0
    assert m["accuracy"] == pytest.approx(np.mean(gold == constant))


def test_stsb_pearson_and_spearman_with_ties():
    # x = 1 2 3 4 5, y = 2 4 5 4 5
    # Pearson: dx = -2 -1 0 1 2, dy = -2 0 1 0 1; sum dx*dy = 6, sum dx^2 = 10, sum dy^2 = 6
    #          r = 6 / sqrt(60) = 0.774596669...
    # Spearman: ranks(x) = 1 2 3 4 5; ranks(y) with ties averaged = 1 2.5 4.5 2.5 4.5
    #          d = -2 -0.5 1.5 -0.5 1.5; sum dx*d = 7, sum d^2 = 9; rho = 7 / sqrt(90) = 0.737864787...
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 4.0, 5.0, 4.0, 5.0])
    m = compute_metrics(TASKS["STS-B"], x, y)
    assert set(m) == {"pearson", "spearman", "mse"}
    assert m["mse"] == pytest.approx(1.8)  # errors -1 -2 -2 0 0: (1 + 4 + 4) / 5
    assert m["pearson"] == pytest.approx(6 / math.sqrt(60))
    assert m["spearman"] == pytest.approx(7 / math.sqrt(90))
    if _stats is not None:
        assert m["pearson"] == pytest.approx(_stats.pearsonr(x, y)[0])
        assert m["spearman"] == pytest.approx(_stats.spearmanr(x, y)[0])


def test_stsb_spearman_random_with_many_ties_vs_scipy():
    if _stats is None:
        pytest.skip("scipy not installed")
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 6, size=200).astype(np.float32)  # heavy ties on both sides
    gold = np.round(pred + rng.normal(scale=1.5, size=200)).clip(0, 5)
    m = compute_metrics(TASKS["STS-B"], pred, gold)
    assert m["pearson"] == pytest.approx(_stats.pearsonr(pred, gold)[0], abs=1e-6)
    assert m["spearman"] == pytest.approx(_stats.spearmanr(pred, gold)[0], abs=1e-9)


def test_stsb_spearman_is_rank_based():
    x = np.array([0.1, 0.5, 1.0, 2.0, 4.5])
    m = compute_metrics(TASKS["STS-B"], np.exp(3 * x), x)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pearson"] < 0.99


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


def _write(root: Path, task: str, text: str, split: str = "dev", bom: bool = False) -> Path:
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{split}.tsv"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return p


def test_get_task_case_insensitive():
    assert get_task("sst-2") is TASKS["SST-2"]
    assert get_task("STS-b") is TASKS["STS-B"]
    with pytest.raises(GlueDataError, match="unknown GLUE task 'qnli'"):
        get_task("qnli")


def test_read_cola_no_header(tmp_path):
    _write(tmp_path, "CoLA", "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                             "gj04\t0\t*\tThe more we study verbs, the crazier they get more.\n"
                             "cj99\t1\t\tIt's \"quoted\".")  # no final newline, like the real dev.tsv
    ex = read_split(TASKS["CoLA"], tmp_path, "dev")
    assert ex == [
        Example("The sailors rode the breeze clear of the rocks.", None, 1),
        Example("The more we study verbs, the crazier they get more.", None, 0),
        Example("It's \"quoted\".", None, 1),
    ]


def test_read_sst2_header(tmp_path):
    _write(tmp_path, "SST-2", "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n\n")
    ex = read_split(TASKS["SST-2"], tmp_path, "dev")
    assert ex == [Example("it 's a charming journey . ", None, 1), Example("unflinchingly bleak ", None, 0)]


def test_read_mrpc_bom_and_quotes(tmp_path):
    _write(tmp_path, "MRPC",
           "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
           "1\t1355540\t1355592\tHe said the pie business doesn 't fit .\t\" The pie business does not fit our strategy .\n"
           "0\t2029631\t2029565\tShe said \"no\" twice .\tHe said \"yes\" .\n",
           bom=True)
    ex = read_split(TASKS["MRPC"], tmp_path, "dev")
    assert ex == [
        Example("He said the pie business doesn 't fit .", "\" The pie business does not fit our strategy .", 1),
        Example("She said \"no\" twice .", "He said \"yes\" .", 0),
    ]
    assert TASKS["MRPC"].labels[1] == "equivalent"  # Quality 1 = paraphrase


def test_read_rte_string_labels(tmp_path):
    _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n"
                            "0\tDana Reeve has died.\tChristopher Reeve had an accident.\tnot_entailment\n"
                            "1\tA cat sat.\tAn animal sat.\tentailment\n")
    ex = read_split(TASKS["RTE"], tmp_path, "dev")
    assert ex == [
        Example("Dana Reeve has died.", "Christopher Reeve had an accident.", 1),
        Example("A cat sat.", "An animal sat.", 0),
    ]
    for e in ex:
        assert TASKS["RTE"].labels[e.label] == ("entailment" if e.text_a == "A cat sat." else "not_entailment")


def test_read_stsb_ten_columns_float_score(tmp_path):
    _write(tmp_path, "STS-B",
           "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\tA man dances.\t5.000\n"
           "1\tmain-news\theadlines\t2015\t0001\tnone\tnone\tStocks fell.\tMarkets rose.\t0.400\n")
    ex = read_split(TASKS["STS-B"], tmp_path, "dev")
    assert ex == [Example("A man is dancing.", "A man dances.", 5.0), Example("Stocks fell.", "Markets rose.", 0.4)]
    assert all(isinstance(e.label, float) for e in ex)
    assert TASKS["STS-B"].problem_type == "regression"


def test_read_wnli(tmp_path):
    _write(tmp_path, "WNLI", "index\tsentence1\tsentence2\tlabel\n"
                             "0\tThe drain is clogged with hair. It has to be cleaned.\tThe hair has to be cleaned.\t0\n"
                             "1\tJane knocked on Susan's door but she did not answer.\tSusan did not answer.\t1\n")
    ex = read_split(TASKS["WNLI"], tmp_path, "dev")
    assert [e.label for e in ex] == [0, 1]
    assert ex[1] == Example("Jane knocked on Susan's door but she did not answer.", "Susan did not answer.", 1)
    assert TASKS["WNLI"].labels == ("not_entailment", "entailment")


def test_read_missing_file(tmp_path):
    expected = tmp_path / "RTE" / "train.tsv"
    with pytest.raises(GlueDataError) as exc:
        read_split(TASKS["RTE"], tmp_path, "train")
    assert str(expected) in str(exc.value)


def test_read_too_few_columns(tmp_path):
    p = _write(tmp_path, "CoLA", "gj04\t1\t\tFine sentence.\ngj04\t1\n")
    with pytest.raises(GlueDataError, match="columns") as exc:
        read_split(TASKS["CoLA"], tmp_path, "dev")
    assert f"{p}:2:" in str(exc.value)


def test_read_too_few_columns_pair_task(tmp_path):
    p = _write(tmp_path, "MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tonly one string\n", bom=True)
    with pytest.raises(GlueDataError, match="columns") as exc:
        read_split(TASKS["MRPC"], tmp_path, "dev")
    assert f"{p}:2:" in str(exc.value)


@pytest.mark.parametrize("task,text", [
    ("SST-2", "sentence\tlabel\ngood\t1\nbad\t2\n"),
    ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tcontradiction\n"),
    ("CoLA", "gj04\tyes\t\tA sentence.\n"),
])
def test_read_unknown_label(tmp_path, task, text):
    p = _write(tmp_path, task, text)
    with pytest.raises(GlueDataError, match="unknown label") as exc:
        read_split(TASKS[task], tmp_path, "dev")
    assert str(p) in str(exc.value)


def test_read_header_only_file(tmp_path):
    p = _write(tmp_path, "SST-2", "sentence\tlabel\n")
    with pytest.raises(GlueDataError, match="no examples") as exc:
        read_split(TASKS["SST-2"], tmp_path, "dev")
    assert str(p) in str(exc.value)


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def test_read_stsb_row_missing_score_column(tmp_path):
    p = _write(tmp_path, "STS-B", STSB_HEADER + "0\tg\tf\t2012\t0000\tnone\tnone\tA man.\tA person.\n")
    with pytest.raises(GlueDataError, match="columns") as exc:
        read_split(TASKS["STS-B"], tmp_path, "dev")
    assert str(p) in str(exc.value)


def test_read_stsb_non_numeric_score(tmp_path):
    p = _write(tmp_path, "STS-B", STSB_HEADER + "0\tg\tf\t2012\t0000\tnone\tnone\tA man.\tA person.\tfive\n")
    with pytest.raises(GlueDataError) as exc:
        read_split(TASKS["STS-B"], tmp_path, "dev")
    assert str(p) in str(exc.value)


def test_read_field_with_unicode_line_separator(tmp_path):
    _write(tmp_path, "SST-2", "sentence\tlabel\nfirst part\u2028second part\t1\nplain\t0\n")
    ex = read_split(TASKS["SST-2"], tmp_path, "dev")
    assert ex == [Example("first part\u2028second part", None, 1), Example("plain", None, 0)]


# ---------------------------------------------------------------------------------------------
# the real GLUE dev sets, when present
# ---------------------------------------------------------------------------------------------


def _independent_count(path: Path, header: bool) -> int:
    """Rows in a TSV counted without the reader: split the raw bytes on b'\\n', drop blank lines and the header."""
    lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
    return len(lines) - (1 if header else 0)


@pytest.mark.parametrize("name", list(TASKS))
def test_real_glue_dev_split(name):
    if not GLUE_DIR.is_dir():
        pytest.skip(f"{GLUE_DIR} not present")
    task = TASKS[name]
    path = GLUE_DIR / name / "dev.tsv"
    ex = read_split(task, GLUE_DIR, "dev")
    assert len(ex) == _independent_count(path, task.header)
    assert len(ex) > 0
    assert all(isinstance(e.text_a, str) and e.text_a.strip() for e in ex)
    if task.is_pair:
        assert all(isinstance(e.text_b, str) and e.text_b.strip() for e in ex)
    else:
        assert all(e.text_b is None for e in ex)
    labels = np.array([e.label for e in ex])
    if task.problem_type == "regression":
        assert labels.dtype == np.float64
        assert labels.min() >= 0.0 and labels.max() <= 5.0
        assert labels.std() > 0.5  # a real spread of similarity scores, not a constant column
    else:
        assert set(labels.tolist()) == set(range(len(task.labels)))  # every class occurs, nothing else
