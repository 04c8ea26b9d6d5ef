"""Debian tools some tests need (a TeX engine, pdftotext, Chromium): found on the PATH, or installed with apt-get
where the tests run as root on Debian; otherwise the test is skipped with the reason."""
import os
import shutil
import subprocess

import pytest


def debian_tool(binary: str, packages: str, why: str) -> str:
    path = shutil.which(binary)
    if path:
        return path
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{why} needs {binary} (Debian: apt-get install {packages}); not root or no apt-get here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages.split()]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:   # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    path = shutil.which(binary)
    if not path:
        pytest.skip(f"{why} needs {binary}; apt-get install {packages} failed: {done.stderr.strip()[-300:]}")
    return path
