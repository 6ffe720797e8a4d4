"""`nanoternary-serve model=<export folder or .gguf>`: the OpenAI-compatible server with its chat page.

Binds 127.0.0.1:8080 by default (conf/serve/serve.yaml). SIGTERM or Ctrl-C stops accepting connections
and lets running requests finish (up to drain_timeout_s) before the process exits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
import uvicorn
from omegaconf import DictConfig, OmegaConf

from nanoternary.serve.app import Limits, ServeSettings, create_app

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger(__name__)


def settings_from(cfg: DictConfig) -> ServeSettings:
    return ServeSettings(
        api_key=None if cfg.api_key is None else str(cfg.api_key),
        aliases=tuple(cfg.aliases),
        limits=Limits(**OmegaConf.to_container(cfg.limits)),
        drain_timeout_s=cfg.drain_timeout_s,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.model:
        raise SystemExit("error: name the model to serve: model=<export folder or .gguf>")
    try:
        app = create_app(Path(cfg.model).expanduser(), settings_from(cfg), device=cfg.device)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if cfg.host not in LOOPBACK and not cfg.api_key:
        log.warning(
            "listening on %s without an api_key: anyone who can reach this port can use the model", cfg.host
        )
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=cfg.access_log,
        timeout_graceful_shutdown=cfg.drain_timeout_s,
    )


if __name__ == "__main__":
    main()
