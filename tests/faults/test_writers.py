"""Two writers of one thing — a training and a fine-tuning into one folder, ``--resume`` while
the run is still alive, two ``evaluate.py`` making one report: one wins, the other gets one
line naming the holder; the lock of a killed process blocks nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

from lowres_ssl import cli, cli_results, run_layout


def _hold(lock_code: str, path) -> subprocess.Popen:
    """A child process that holds a lock (``lock_code`` runs with ``p`` the path) and sleeps."""
    code = (
        "import sys, time; from pathlib import Path\n"
        "from lowres_ssl.engine import run_folder\n"
        "from lowres_ssl import files, run_layout\n"
        "p = Path(sys.argv[1])\n"
        f"with {lock_code}:\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def _one_line(capsys, holder) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"process {holder.pid}" in err[0]
    return err[0]


def test_a_second_writer_into_a_run_folder_gets_one_line(finished, folder, tmp_path, capsys):
    run, labeled = finished
    holder = _hold("run_folder.exclusive(p)", run)
    try:
        # --resume while the run is still alive
        assert cli.train_main(["--resume", "--out", str(run), "--max-steps", "5"]) == 2
        assert "is in use by" in _one_line(capsys, holder)
        # a fine-tuning into the folder a training holds
        argv = ["--checkpoint", str(run), "--train", str(labeled), "--out", str(run),
                "--max-steps", "1", "--set", "data.num_workers=0"]  # fmt: skip
        assert cli.finetune_main(argv) == 2
        assert "is in use by" in _one_line(capsys, holder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The holder died: its lock blocks nothing (the run is finished: nothing to train).
    assert cli.train_main(["--resume", "--out", str(run), "--max-steps", "3"]) == 0


def test_two_evaluations_of_one_report(finished, capsys):
    run, labeled = finished
    name = run_layout.eval_file("knn")
    holder = _hold(f"files.held(run_layout.report_lock(p, {name!r}), lambda h: h)", run)
    argv = ["knn", "--checkpoint", str(run), "--train", str(labeled), "--test", str(labeled),
            "--num-workers", "0", "--k", "3"]  # fmt: skip
    try:
        assert cli_results.evaluate_main(argv) == 2
        text = _one_line(capsys, holder)
        assert f"{run / name} is being made by" in text
        assert not (run / name).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert cli_results.evaluate_main(argv) == 0  # the killed holder's lock is gone with it
    assert (run / name).is_file()
