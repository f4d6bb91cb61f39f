"""records/small_scale_table.py on logs built by hand."""
import subprocess
import sys

from conftest import REPO


def write_log(path, losses, step_avg):
    T = 10 * (len(losses) - 1)
    lines = ["print(f'step:{step}/{T} val_loss:{val_loss:.4f}')"]  # code copy at the top is ignored
    lines += [f"step:{10 * i}/{T} val_loss:{x:.4f} train_time:{10 * i * step_avg:.0f}ms step_avg:{step_avg:.2f}ms"
              for i, x in enumerate(losses)]
    path.write_text("\n".join(lines) + "\n")


def test_table_numbers(tmp_path):
    write_log(tmp_path / "muon_lr0.01_seed0.txt", [9, 6, 5, 4.5, 4.2, 4.0], 20.0)  # target: step 40 -> 4.2
    write_log(tmp_path / "muon_lr0.02_seed0.txt", [9, 6, 5.5, 5, 4.6, 4.4], 20.0)
    write_log(tmp_path / "muon_lr0.01_seed1.txt", [9, 6, 5, 4.5, 4.3, 4.1], 20.0)
    write_log(tmp_path / "dynmuon_lr0.01_seed0.txt", [9, 5, 4.5, 4.2, 4.0, 3.9], 21.0)
    write_log(tmp_path / "dynmuon_lr0.01_seed1.txt", [9, 5.5, 4.6, 4.1, 4.0, 3.7], 21.0)
    write_log(tmp_path / "adamw_lr0.002_seed0.txt", [9, 7, 6, 5.5, 5, 4.8], 19.0)
    out = subprocess.run([sys.executable, str(REPO / "records" / "small_scale_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[1:-1]] for l in out.stdout.splitlines()
            if l.startswith("| ") and not l.startswith("| variant")}
    assert "Target: 4.2000 = val loss of muon_lr0.01_seed0 at step 40" in out.stdout
    assert rows["muon"][1:] == ["0.01: 4.0000, 0.02: 4.4000", "0.01", "0,1", "4.0500 ± 0.0707", "40, 50",
                                "-12.5%", "20.0"]
    assert rows["dynmuon"][2:] == ["0.01", "0,1", "3.8000 ± 0.1414", "30, 30", "+25.0%", "21.0"]
    assert rows["adamw"][4:7] == ["4.8000", "-", "not reached"]


def test_missing_reference_exits_2(tmp_path):
    write_log(tmp_path / "dynmuon_lr0.01_seed0.txt", [9, 5, 4], 20.0)
    out = subprocess.run([sys.executable, str(REPO / "records" / "small_scale_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no muon_lr" in out.stderr
