"""Checkpoint damage and storage faults: every corruption of every checkpoint file is detected, a
resume skips a damaged checkpoint (or starts over when all are), and a full disk, a read-only output
or an output under a file fail with a clear message and damage nothing. Uses the fault lab of
tests/conftest.py (`lab`) and the pieces in tests/faultlab.py; the kill, signal and non-finite
tests are in tests/test_faults.py."""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from faultlab import FILES, STEPS, corrupt, corruptions, differences, mount_tmpfs, pages, report, umount
from tunelab.run.files import verify
from tunelab.training.checkpoint import list_checkpoints, load_latest


# ----------------------------------------------------------------------------- corrupt checkpoints

def test_every_corruption_of_every_checkpoint_file_is_detected(lab, tmp_path):
    rnd = random.Random(7)
    cases = corruptions(rnd)
    detected = 0
    for i, (name, kind, how) in enumerate(cases):
        root = tmp_path / f"c{i}"
        shutil.copytree(lab.ref / "checkpoints", root)
        newest = list_checkpoints(root)[-1]
        corrupt(newest / name, how)
        warnings: list[str] = []
        found = load_latest(root, warn=warnings.append)
        assert found is not None and found[0] == list_checkpoints(root)[-2], (name, kind)
        assert len(warnings) == 1 and f"skipping checkpoint {newest}" in warnings[0], warnings
        if name != "manifest.json":  # a damaged manifest may be reported through the file it misdescribes
            assert str(newest / name) in warnings[0], (kind, warnings)
        detected += 1
    report("corrupt checkpoints", corruptions_tried=len(cases), detected=detected,
           file_kinds=len(FILES))


def _interrupted_copy(lab, name: str) -> Path:
    """The reference run as a crash before its final output would have left it."""
    run = lab.root / name
    shutil.copytree(lab.ref, run)
    shutil.rmtree(run / "final")
    return run


@pytest.mark.parametrize("name, kind", [("trainable.safetensors", "flip"), ("optimizer.safetensors", "truncate"),
                                        ("rng.safetensors", "delete"), ("state.json", "flip"),
                                        ("manifest.json", "garbage")])
def test_resume_skips_a_corrupt_checkpoint_with_a_warning(lab, name, kind):
    """A real resume: the damaged newest checkpoint is named in a warning, the previous one is
    used, and the run still ends identical to the reference."""
    run = _interrupted_copy(lab, f"corrupt-{name}")
    how = {k: h for f, k, h in corruptions(random.Random(name)) if f == name}[kind]
    newest = list_checkpoints(run / "checkpoints")[-1]
    corrupt(newest / name, how)
    done = lab.fs.run(["train", str(run)])
    assert done.rc == 0, done.stderr()
    warning = next(ln for ln in done.stderr().splitlines() if ln.startswith("warning: skipping checkpoint"))
    assert str(newest) in warning and (name == "manifest.json" or str(newest / name) in warning)
    assert f"from step-{STEPS - 1}" in done.stdout()
    assert not differences(run, lab.outcome)


def test_all_checkpoints_corrupt_starts_over_and_says_so(lab):
    run = _interrupted_copy(lab, "corrupt-all")
    for c in list_checkpoints(run / "checkpoints"):
        corrupt(c / "trainable.safetensors", lambda b: b[:100])
    done = lab.fs.run(["train", str(run)])
    assert done.rc == 0 and "holds no valid checkpoint; starting from step 0" in done.stderr()
    assert not differences(run, lab.outcome)



# ----------------------------------------------------------------------------- disk full / read-only

def test_disk_full_fails_clearly_and_damages_nothing(lab, tmp_path):
    """On a tmpfs with room for the run's small files and two and a half checkpoints, the third
    checkpoint write fails: the message names it and the OS reason, earlier checkpoints verify,
    nothing partial is left, and after space is freed the run resumes to the reference result."""
    ckpt_pages = pages(lab.ref / "checkpoints" / f"step-{STEPS}")
    size_kib = 4 * (8 + 2 * ckpt_pages + ckpt_pages // 2)
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, f"size={size_kib}k")
    try:
        run = mnt / "run"
        full = lab.fs.run(["train", str(lab.cfg), f"output={run}", "train.keep_checkpoints=10"])
        err = full.stderr()
        assert full.rc == 2 and "Traceback" not in err, err
        assert "tunelab: error: could not write" in err and "No space left on device" in err
        good = list_checkpoints(run / "checkpoints")
        failed = f"step-{len(good) + 1}"
        assert len(good) >= 2 and f"{run / 'checkpoints' / failed}" in err
        assert all(verify(c) is None for c in good)
        assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
        subprocess.run(["mount", "-o", f"remount,size={size_kib * 8}k", str(mnt)], check=True)
        done = lab.fs.run(["train", str(run)])
        assert done.rc == 0, done.stderr()
        assert f"from step-{len(good)}" in done.stdout()
        assert not differences(run, lab.outcome)
        report("disk full", failed_write=failed, earlier_checkpoints_intact=len(good), resumed_identical=True)
    finally:
        umount(mnt)


def test_read_only_output_fails_clearly(lab, tmp_path):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro,size=64k")
    try:
        res = lab.fs.run(["train", str(lab.cfg), f"output={ro / 'run'}"])
        assert res.rc == 2 and "Traceback" not in res.stderr()
        assert f"cannot create the run directory {ro / 'run'}: Read-only file system" in res.stderr()
    finally:
        umount(ro)


def test_output_under_a_file_fails_clearly(lab, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    res = lab.fs.run(["train", str(lab.cfg), f"output={tmp_path / 'notes.txt' / 'run'}"])
    assert res.rc == 2 and "Traceback" not in res.stderr()
    assert f"cannot create the run directory {tmp_path / 'notes.txt' / 'run'}: Not a directory" in res.stderr()


