"""Offline ``bentoml build`` of the Recommender service, pinned to one registry model version.

Steps (docs/stack-notes.md, BentoML): write ``build/bento/requirements.txt`` = ``requirements.lock``
without torch; ``pip download torch==2.13.0 --no-deps -d build/bento/wheels`` (pip finds the CPU
build locally); then ``bentoml build -f <bentofile> .`` from the project root. With ``--version N``
a copy of ``infra/bentofile.yaml`` is written to ``build/bento/bentofile.yaml`` with the label
``model_version`` and the env ``RECLOOP_SERVE_MODEL_VERSION`` set to N, and that copy is built.

Run: ``python -m serving.bento_build [--version N]``.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = Path("build/bento")  # relative to the project root, as the bentofile refers to it
TORCH_PIN = "torch==2.13.0"
BENTOFILE = Path("infra/bentofile.yaml")
VERSION_ENV = "RECLOOP_SERVE_MODEL_VERSION"  # the env the service reads its pinned model version from

logger = logging.getLogger(__name__)


def requirements_without_torch(lock_text: str) -> str:
    """The lock's requirement lines minus torch (comments and ``# via`` lines dropped). Pure."""
    keep = []
    for line in lock_text.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("-"):
            continue
        if re.match(r"^torch(==|\s|$)", s):
            continue
        keep.append(s)
    return "\n".join(keep) + "\n"


def pin_bentofile(text: str, version: str) -> str:
    """``bentofile.yaml`` text with the model version pinned (label and env). Pure.

    The YAML is parsed and dumped again (keys keep their order; comments are dropped).

    Raises:
        ValueError: the bentofile lacks the ``model_version`` label or the env entry.
    """
    config = yaml.safe_load(text) or {}
    labels = config.get("labels") or {}
    envs = [e for e in config.get("envs") or [] if e.get("name") == VERSION_ENV]
    has_label = "model_version" in labels
    if not has_label or len(envs) != 1:
        raise ValueError(f"bentofile needs one model_version label and one {VERSION_ENV} env; "
                         f"found {int(has_label)} and {len(envs)}")
    labels["model_version"] = str(version)
    envs[0]["value"] = str(version)
    return yaml.safe_dump(config, sort_keys=False)


def prepare(root: Path = PROJECT_ROOT) -> Path:
    """Write the requirements and fetch the torch wheel into ``root/build/bento``. Returns the wheel."""
    build = root / BUILD_DIR
    (build / "wheels").mkdir(parents=True, exist_ok=True)
    lock = (root / "requirements.lock").read_text()
    (build / "requirements.txt").write_text(requirements_without_torch(lock))
    pip = [sys.executable, "-m", "pip", "download", TORCH_PIN, "--no-deps", "-d", str(BUILD_DIR / "wheels")]
    subprocess.run(pip, cwd=root, check=True)
    wheels = sorted((build / "wheels").glob("torch-2.13.0*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no torch wheel in {build / 'wheels'}")
    return wheels[-1]


def build(version: str | None = None, root: Path = PROJECT_ROOT) -> str:
    """Prepare and run ``bentoml build``; returns its output (contains the Bento tag)."""
    wheel = prepare(root)
    text = (root / BENTOFILE).read_text()
    wheel_rel = (BUILD_DIR / "wheels" / wheel.name).as_posix()
    if wheel_rel not in text:
        raise FileNotFoundError(f"{BENTOFILE} lists another torch wheel; pip downloaded {wheel_rel}")
    bentofile = BENTOFILE
    if version is not None:
        bentofile = BUILD_DIR / "bentofile.yaml"
        (root / bentofile).write_text(pin_bentofile(text, version))
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    result = subprocess.run([bentoml, "build", "-f", str(bentofile), "."], cwd=root, check=True,
                            capture_output=True, text=True)
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=None, help="registry model version to pin")
    args = parser.parse_args()
    from recloop.settings import configure_environment

    configure_environment()
    sys.stdout.write(build(args.version))


if __name__ == "__main__":
    main()
