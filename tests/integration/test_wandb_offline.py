"""`logger=wandb` with WANDB_MODE=offline: the local run files hold our metrics, nothing goes to the
network, and the run id recorded in meta.json is reused when the run is resumed in its folder."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from nanoternary.cli.tracking import ID_ALPHABET, recorded_wandb_id, wandb_run_id
from nanoternary.cli.train import CONF_DIR
from tests.train_cli import TINY, metric_rows, train_cli

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="optional extra: pip install -e '.[wandb]'")


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of a run-<id>.wandb file: a 7-byte header, then a LevelDB-style log of 32 KiB
    blocks whose chunks (crc32, length, type; type 1 = whole record, 2/3/4 = first/middle/last part)
    carry serialized wandb Record messages."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, payload, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def history(path: Path) -> list[dict[str, float]]:
    """Every logged row; a key with a "/" is stored as its parts (nested_key)."""
    rows = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in wandb_records(path)
        if r.HasField("history")
    ]
    assert rows, f"no history records in {path}"
    return rows


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it: W&B's server address and every
    HTTP(S) proxy variable point here, so any attempt to reach the network shows up as a connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture()
def offline_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], Listener]]:
    listener = Listener()
    home = tmp_path / "wandb-home"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": listener.url,
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_API_KEY": "",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    env.update(
        {k: listener.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")}
    )
    yield env, listener
    listener.close()


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def run_id_of(run_dir: Path, folder: str = "final") -> str:
    return json.loads((run_dir / "export" / folder / "meta.json").read_text())["training"]["wandb_run_id"]


@pytest.mark.slow  # ~45-90 s on 2 shared cores (one training run + the W&B service)
def test_offline_run_logs_our_metrics_locally_and_touches_no_network(tmp_path, cache_dir, offline_env):
    env, listener = offline_env
    run_dir = tmp_path / "run"
    train_cli(cache_dir, "logger=wandb", *TINY, f"run_dir={run_dir}", env=env)
    [offline] = offline_runs(run_dir)
    run_id = run_id_of(run_dir)
    assert len(run_id) == 8 and set(run_id) <= set(ID_ALPHABET)
    assert offline.name.endswith(f"-{run_id}") and (offline / f"run-{run_id}.wandb").is_file()
    [run] = [r.run for r in wandb_records(offline / f"run-{run_id}.wandb") if r.HasField("run")]
    assert (run.run_id, run.project) == (run_id, "nanoternary")
    logged = history(offline / f"run-{run_id}.wandb")
    for key in ("train/loss", "train/grad_norm", "val/loss", "val/bpb"):  # the same numbers as metrics.csv
        assert [row[key] for row in logged if key in row] == [v for _, v in metric_rows(run_dir, key)], key
    assert (run_dir / "metrics.csv").is_file()  # logger=wandb keeps the CSV log (report, resume)
    assert listener.connections == 0


@pytest.mark.slow  # two training runs
def test_resume_continues_the_same_wandb_run(tmp_path, cache_dir, offline_env):
    env, listener = offline_env
    run_dir = tmp_path / "run"
    train_cli(cache_dir, "logger=wandb", *TINY, f"run_dir={run_dir}", env=env)
    first_id = run_id_of(run_dir)
    train_cli(
        cache_dir,
        "logger=wandb",
        *TINY,
        f"run_dir={run_dir}",
        "ckpt_path=auto",
        "trainer.max_steps=4",
        env=env,
    )
    assert run_id_of(run_dir) == run_id_of(run_dir, "step-00000004") == first_id
    first, second = offline_runs(run_dir)
    assert first.name.endswith(first_id) and second.name.endswith(first_id)
    steps = [
        row["trainer/global_step"] for row in history(second / f"run-{first_id}.wandb") if "train/loss" in row
    ]
    assert steps == [2, 3]  # the resumed run logs on from where the first one stopped
    assert listener.connections == 0


def compose_wandb(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["logger=wandb", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def write_meta(folder: Path, training: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "model": {}, "training": training}))


def test_run_id_is_configured_recorded_or_new(tmp_path):
    assert wandb_run_id(compose_wandb(tmp_path, "logger.wandb.id=fixed123"), continuing=True) == "fixed123"
    write_meta(tmp_path / "export" / "step-00000002", {"wandb_run_id": "abcd1234"})
    assert recorded_wandb_id(tmp_path) == "abcd1234"
    assert wandb_run_id(compose_wandb(tmp_path), continuing=True) == "abcd1234"
    fresh = {wandb_run_id(compose_wandb(tmp_path), continuing=False) for _ in range(3)}
    assert len(fresh) == 3 and "abcd1234" not in fresh  # a new run in the folder gets a new id
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert wandb_run_id(compose("train", overrides=["logger=csv"]), continuing=True) is None


def test_a_corrupt_meta_is_skipped_when_looking_for_the_id(tmp_path):
    write_meta(tmp_path / "export" / "step-00000002", {"wandb_run_id": "older111"})
    (tmp_path / "export" / "final").mkdir()
    (tmp_path / "export" / "final" / "meta.json").write_text("{not json")
    assert recorded_wandb_id(tmp_path) == "older111"
    assert recorded_wandb_id(tmp_path / "nothing-here") is None
