"""The WebUI's install.py: installs only what is missing, never moves the host's own packages."""

from __future__ import annotations

import importlib.metadata
import runpy
import sys
import types
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def _run(monkeypatch, installed: dict[str, str | None]) -> list[tuple[str, str, str]]:
    """Run install.py with a stand-in `launch` module and the given installed versions; the pip calls made."""
    calls = []

    def run_pip(command: str, desc: str | None = None) -> None:
        constraints = ""
        if ' -c "' in command:
            constraints = Path(command.split('-c "')[1].split('"')[0]).read_text()
        calls.append((command, desc, constraints))

    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=run_pip))
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name in installed:
            if installed[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return calls


def test_nothing_is_installed_when_everything_is_there(monkeypatch):
    calls = _run(monkeypatch, {"diffusers": "0.31.0", "peft": "0.13.2", "tensorboard": "2.20.0",
                               "open-clip-torch": "2.20.0"})
    assert calls == []


def test_missing_packages_are_installed_pinned_to_the_hosts_versions(monkeypatch):
    host = {"torch": "2.1.2", "numpy": "1.26.2", "gradio": "3.41.2", "transformers": "4.30.2", "pydantic": "1.10.27",
            "protobuf": "3.20.0", "huggingface-hub": "0.36.2", "accelerate": "0.21.0"}
    calls = _run(monkeypatch, {**host, "diffusers": None, "peft": "0.7.0", "tensorboard": "2.20.0",
                               "open-clip-torch": None})
    commands = [c for c, _, _ in calls]
    assert any('"diffusers==0.31.0"' in c for c in commands)
    assert any('"peft==0.13.2"' in c for c in commands)  # too old for us: replaced
    assert not any("tensorboard" in c for c in commands)
    assert commands[-1] == "install --no-deps open-clip-torch"
    for command, _, constraints in calls[:-1]:
        assert command.startswith("install -c ")
        for name, version in host.items():
            assert f"{name}=={version}" in constraints.splitlines()


def test_the_constraints_file_is_removed(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    _run(monkeypatch, {"diffusers": None})
    assert list(tmp_path.iterdir()) == []
