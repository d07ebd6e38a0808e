"""The web process never imports torch: jobs that need it run in their own processes (docs/design.md, "Layout").

The app is served in a fresh Python process (this test process has torch loaded by other tests), a job is
submitted through its public API and a what-if overlay is rendered (the two paths that used to import torch
through config -> schemes); then the app process reports whether ``torch`` is in its ``sys.modules``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import make_home

ROOT = Path(__file__).resolve().parent.parent

APP_PROCESS = textwrap.dedent("""
    import json, os, sys
    from gradio_client import Client
    from backend.dev.synth import read_shards
    from tests.conftest import app_server
    from pathlib import Path

    home = Path(sys.argv[1])
    with app_server(home, TOKVIZ_MAX_JOBS="1") as (url, ctx):
        client = Client(url, verbose=False)
        job_id = client.predict("steps: 1\\nn_train: 8\\nn_eval: 0\\nbatch_size: 2\\nname: notorch", "",
                                api_name="/launch")
        tok = read_shards(home / "runs" / "synth-sft", "tokens")
        sample = int(sorted(tok[tok.step == 20].sample_idx.unique())[0])
        html = client.predict("synth-sft", 20, sample, "what-if:antiop", None, api_name="/recolour")
        report = {"job_id": job_id, "what_if": "weight scheme antiop would give" in html,
                  "torch": "torch" in sys.modules,
                  "torch_modules": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:5]}
        ctx.jobs.shutdown(timeout=30)
    print("REPORT " + json.dumps(report))
""")


def test_the_app_process_never_imports_torch(tmp_path):
    home = make_home(tmp_path / "home", xss=False)
    out = subprocess.run([sys.executable, "-c", APP_PROCESS, str(home)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")]
    assert out.returncode == 0 and lines, f"app process failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["job_id"].startswith("job1-") and report["what_if"]
    assert not report["torch"], f"the app process imported torch: {report['torch_modules']}"
