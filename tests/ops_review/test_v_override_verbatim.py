"""Secret overrides are documented 'taken verbatim', but ${VAR} expansion still rewrites them."""
from __future__ import annotations

from pathlib import Path

from daemon.config import load_config

CFG = """pbx:
  base_url: https://127.0.0.1:9
  client_id: cid
  client_secret: file-secret
archive:
  dir: {d}/arch
state:
  path: {d}/state/ledger.db
"""


def _cfg(tmp_path: Path) -> Path:
    (tmp_path / "arch").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text(CFG.format(d=tmp_path))
    return p


def test_v5a_secret_override_is_expanded_not_verbatim(tmp_path: Path) -> None:
    secret = "Xy${HOME}9"
    cfg = load_config(_cfg(tmp_path), {"YEASTAR_ARCHIVER_PBX__CLIENT_SECRET": secret, "HOME": "/root"})
    assert cfg.pbx.client_secret.reveal() == secret
