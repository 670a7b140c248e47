"""benchmarks/gpu_check.sh, rehearsed on the CPU with a tiny model: it runs end to end and writes its files."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_rehearsed_on_the_cpu(tmp_path):
    env = os.environ | {"OUT": str(tmp_path / "out"), "DEVICE": "cpu", "MODEL": "small-cnn", "SIZES": "28",
                        "BATCH": "16", "STEPS": "2", "BLOCKS": "1", "RUN_MODEL": "small-cnn", "RUN_IMAGES": "10",
                        "PYTHON": os.sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench-small-cnn-28.json").read_text())
    assert result["optstate_img_s"] > 0 and "seed_preset_projected_s" in result
    report = (tmp_path / "out" / "report.md").read_text()
    assert "onecycle" in report and "generated" in report
    assert "gpu_check: done" in done.stdout
