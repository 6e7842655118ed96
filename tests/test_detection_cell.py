"""One detection cell end to end on the offline detection set (tiny images), and mAP read from a
YOLO-layout folder with known boxes."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from prunegrid import pipeline, tracking
from prunegrid.config import build, compose
from prunegrid.detection.module import DetectionMetrics, targets_of
from tests.conftest import tiny


@pytest.fixture(scope="module")
def det_set(tmp_path_factory, fashion_dir) -> Path:
    from prunegrid.data.detection_set import Options, build as build_set

    out = tmp_path_factory.mktemp("det") / "fashion_det"
    build_set(Options(out=str(out), size=64, train=24, val=8, test=8, fashion_root=str(fashion_dir)))
    return out


def det_overrides(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return ["task=detection", f"dataset.root={root}", "dataset.input_size=64", "dataset.subset=null",
            *tiny(tmp_path), "dataset.subset=null", "dataset.batch_size=8", "dataset.eval_batch_size=8",
            "task.deploy.images=4", "task.deploy.min_seconds=0.3", "task.deploy.interval_s=0.1",
            "task.deploy.warmup=1", *extra]


def test_one_detection_cell_finishes_with_every_contract_key(tmp_path, det_set):
    cfg = compose(det_overrides(tmp_path, det_set, "prune=l1_static", "trainer.max_epochs=2",
                                "measure.memory=true", "tracking.log_model=true"))
    result = pipeline.run(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert [k for k in tracking.DETECTION_REQUIRED_METRICS if k not in m] == []
    assert [k for k in tracking.DETECTION_VAL_FINAL_METRICS if k not in m] == []
    assert m["l1/conv_sparsity"] == pytest.approx(0.4, abs=2e-3) and m["l1/bn_sparsity"] == pytest.approx(0.3, abs=5e-3)
    assert m["memory/detect_samples"] >= 2 and m["memory/detect_peak_mb"] >= m["memory/detect_increase_mb"] > 0
    assert m["time/detect_ms"] > 0 and m["model/params"] > 1e6
    assert not any(k.startswith("test/acc") for k in m)
    tags = run.data.tags
    assert tags["deploy_status"] == "ok" and tags["onnx_status"] == "ok" and tags["status_detail"] == ""
    assert (tags["backbone"], tags["dataset"], tags["loss"]) == ("yolov5n", "fashion_det", "yolov5")
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curves.png", "detection_report.txt", "model"} <= arts
    report = Path(client.download_artifacts(run.info.run_id, "detection_report.txt", str(tmp_path))).read_text()
    assert "Sneaker" in report and "mAP50-95" in report


def test_a_classification_dataset_with_a_detector_is_one_line(tmp_path):
    from prunegrid.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset=fashion_mnist is made for task=classification") as err:
        compose(["task=detection", "dataset=fashion_mnist"])
    assert "\n" not in str(err.value)


def write_yolo(root: Path) -> None:
    """Two 100x100 images: one box of class 0 in each (and a class-1 box in the second)."""
    from PIL import Image

    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, lines in enumerate(["0 0.30 0.30 0.40 0.40\n", "0 0.40 0.40 0.40 0.40\n1 0.80 0.80 0.20 0.20\n"]):
            Image.new("RGB", (100, 100), (i * 50, 0, 0)).save(root / "images" / split / f"im{i}.png")
            (root / "labels" / split / f"im{i}.txt").write_text(lines)
    (root / "data.yaml").write_text("names: [cat, dog]\ntrain: images/train\nval: images/val\ntest: images/test\n")


def test_map50_from_a_yolo_folder_perfect_then_one_box_shifted(tmp_path):
    write_yolo(tmp_path / "yolo")
    cfg = compose(["task=detection", f"dataset.root={tmp_path / 'yolo'}", "dataset.input_size=96", "dataset.hflip=false"])
    data = build(cfg.dataset, seed=0)
    data.setup()
    images, targets = next(iter(data.loader("test", shuffle=False, batch_size=2)))
    gts = targets_of(targets, len(images), tuple(images.shape[2:]))
    # boxes in pixels of the 96 px input: (cx, cy, w, h) = (0.3, 0.3, 0.4, 0.4) -> x1 = 0.1 * 96 = 9.6, x2 = 48
    assert torch.allclose(gts[0]["boxes"], torch.tensor([[9.6, 9.6, 48.0, 48.0]]), atol=1e-4)
    perfect = DetectionMetrics(2)
    perfect.update([torch.cat((g["boxes"], torch.full((len(g["boxes"]), 1), 0.9), g["labels"][:, None].float()), 1)
                    for g in gts], gts)
    r = perfect.compute()
    assert r["map50"] == pytest.approx(1.0) and np.allclose(r["ap50"], [1.0, 1.0])
    # the dog box shifted by its own width: IoU 0, so dog AP50 = 0 and mAP50 = (1 + 0) / 2
    shifted = [torch.cat((g["boxes"], torch.full((len(g["boxes"]), 1), 0.9), g["labels"][:, None].float()), 1)
               for g in gts]
    shifted[1][1, [0, 2]] -= 0.2 * 96
    m = DetectionMetrics(2)
    m.update(shifted, gts)
    r = m.compute()
    assert r["ap50"][0] == pytest.approx(1.0) and r["ap50"][1] == pytest.approx(0.0)
    assert r["map50"] == pytest.approx(0.5)
    # the second cat box shifted 0.2 of the image right: IoU = (0.2*0.4) / (2*0.16 - 0.08) = 1/3 < 0.5: one TP at
    # rank 1 and one FP at rank 2 of two cats -> COCO's 101-point AP = 51/101; dog perfect -> mAP50 = (51/101 + 1)/2
    shifted = [torch.cat((g["boxes"], torch.full((len(g["boxes"]), 1), s), g["labels"][:, None].float()), 1)
               for g, s in zip(gts, (0.9, 0.8))]
    shifted[1][0, [0, 2]] += 0.2 * 96
    m = DetectionMetrics(2)
    m.update(shifted, gts)
    r = m.compute()
    assert r["ap50"][0] == pytest.approx(51 / 101, abs=1e-6)
    assert r["map50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-6)


def test_data_md5_of_a_stage_output_from_its_dvc_lock(tmp_path):
    """The offline set is a stage output (prep/dvc.yaml, wdir ..): its runs are tagged with the md5
    that prep/dvc.lock records, not `untracked`."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "prep").mkdir()
    (tmp_path / "prepared" / "fashion_det" / "images").mkdir(parents=True)
    (tmp_path / "prep" / "dvc.yaml").write_text("stages:\n  fashion_det:\n    wdir: ..\n    cmd: build\n"
                                                "    outs:\n      - prepared/fashion_det\n")
    (tmp_path / "prep" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  fashion_det:\n    cmd: build\n    outs:\n"
                                                "    - path: prepared/fashion_det\n      hash: md5\n"
                                                "      md5: 0123456789abcdef.dir\n")
    assert tracking.data_md5(tmp_path / "prepared" / "fashion_det") == "0123456789abcdef.dir"
    assert tracking.data_md5(tmp_path / "prepared" / "fashion_det" / "images") == "0123456789abcdef.dir"
    assert tracking.data_md5(tmp_path / "prepared") == "untracked"
