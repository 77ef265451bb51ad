import numpy as np
import pandas as pd
import pytest

from ichdlib.config import ParamsError, load_params, parse_overrides
from ichdlib.labels import LABELS, LabelFileError, long_to_wide, read_labels, wide_to_long


def test_label_order_is_the_contract():
    assert LABELS == ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def test_long_rows_with_duplicates_pivot_to_wide(tmp_path):
    rows = []
    for sop, pos in [("ID_aa", "subdural"), ("ID_bb", None)]:
        for lab in ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]:
            rows.append((f"{sop}_{lab}", int(lab == pos or (lab == "any" and pos is not None))))
    rows.append(rows[0])  # exact duplicate
    rows.append(rows[4])
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(tmp_path / "l.csv", index=False)
    wide, problems = read_labels(tmp_path / "l.csv")
    assert list(wide.columns) == list(LABELS)
    assert wide.loc["ID_aa"].tolist() == [1, 0, 0, 0, 0, 1]
    assert wide.loc["ID_bb"].sum() == 0
    assert problems.empty


def test_conflicting_and_missing_rows_are_reported():
    long = pd.DataFrame({"ID": ["ID_aa_any", "ID_aa_any", "ID_aa_epidural"], "Label": [0, 1, 0]})
    wide, problems = long_to_wide(long)
    assert wide.loc["ID_aa", "any"] == 1
    reasons = " ".join(problems.reason)
    assert "conflicting" in reasons and "missing label rows" in reasons


def test_malformed_ids_fail_with_the_source_named():
    with pytest.raises(LabelFileError, match="x.csv: 1 malformed"):
        long_to_wide(pd.DataFrame({"ID": ["ID_aa_nothing"], "Label": [0]}), source="x.csv")


def test_wide_to_long_is_kaggle_order():
    wide = pd.DataFrame([np.arange(6) / 10], columns=LABELS, index=pd.Index(["ID_cc"], name="sop_uid"))
    long = wide_to_long(wide)
    assert long.ID.tolist()[0] == "ID_cc_epidural" and long.ID.tolist()[-1] == "ID_cc_any"
    assert long.Label.tolist()[-1] == 0.0 and long.Label.tolist()[0] == 0.1


@pytest.mark.parametrize("name", ["smoke", "demo", "rsna_gpu", "demo_external", "demo_robust"])
def test_shipped_params_validate(name):
    P = load_params(f"params/{name}.yaml")
    assert P.run and P.work_dir.is_absolute()


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    (tmp_path / "p").mkdir()
    f = tmp_path / "p" / "x.yaml"
    f.write_text("cnn:\n  epochz: 3\nseq:\n  epochs: many\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert "cnn.epochz: unknown key" in msg and "seq.epochs" in msg and str(f) in msg


def test_overrides_and_root_resolution(tmp_path):
    (tmp_path / "params").mkdir()
    f = tmp_path / "params" / "x.yaml"
    f.write_text("run: r1\n")
    P = load_params(f, parse_overrides(["ingest.size=64", "run=r2"]))
    assert P.ingest.size == 64 and P.work_dir == tmp_path / "work" / "r2"
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_overrides(["oops"])


def test_extends_merges_the_base_file_and_the_file_wins(tmp_path):
    d = tmp_path / "params"
    d.mkdir()
    (d / "base.yaml").write_text("run: base\nseed: 7\ncnn:\n  cpu_threads: 2\n  augment:\n    hflip: 0.2\n"
                                 "  backbones:\n    - name: test_resnet\n      epochs: 3\n    - name: resnet18\n")
    (d / "child.yaml").write_text("extends: base.yaml\nrun: child\ncnn:\n  augment:\n    erase: 0.0\n"
                                  "  backbones:\n    - name: test_resnet\n      epochs: 5\n")
    P = load_params(d / "child.yaml")
    assert (P.run, P.seed, P.cnn.cpu_threads) == ("child", 7, 2)           # inherited, own key wins
    assert (P.cnn.augment.hflip, P.cnn.augment.erase) == (0.2, 0.0)        # sections merge key by key
    assert [(b.name, b.epochs) for b in P.cnn.backbones] == [("test_resnet", 5)]  # a list replaces the list
    assert P.root == tmp_path  # the root follows the file that was loaded


@pytest.mark.parametrize("files, match", [
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, r"goes round in a circle \(a.yaml -> b.yaml -> a.yaml\)"),
    ({"a.yaml": "extends: nope.yaml\n"}, r"params file not found: .*nope.yaml \(extended by .*a.yaml\)"),
    ({"a.yaml": "extends: 3\n"}, r"a.yaml: extends: expected the path of another params file"),
])
def test_extends_errors_are_one_line(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ParamsError, match=match):
        load_params(tmp_path / "a.yaml")
