"""Configuration of the node: flags, environment, config file, models file, model profiles."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from t2i_common.config import ConfigError
from t2i_orchestrator.config import load_config
from t2i_orchestrator.demo_model import DEMO_MODEL_ID
from t2i_orchestrator.models import ModelProfile, ModelSpec, dtype_for, load_models_file, profile_for
from t2i_orchestrator.storage import ImageStore


def test_defaults_serve_the_demo_model_on_8936() -> None:
    config = load_config([])
    assert config.port == 8936 and config.host == "127.0.0.1"
    assert config.models == (ModelSpec(DEMO_MODEL_ID, warm=True),)


def test_command_line_beats_environment_beats_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "orchestrator.toml"
    config_file.write_text('port = 9001\nmax-queue = 2\nimage_ttl = 60\ndevice = "cpu"\n')
    monkeypatch.setenv("T2I_ORCHESTRATOR_PORT", "9002")
    monkeypatch.setenv("T2I_ORCHESTRATOR_MAX_QUEUE", "5")
    config = load_config(["--config", str(config_file), "--port", "9003"])
    assert (config.port, config.max_queue, config.image_ttl_s, config.device) == (9003, 5, 60.0, "cpu")
    # One folder whatever the port (an embedded node's changes every run), so every run sweeps it.
    assert config.storage_dir == load_config(["--port", "9004"]).storage_dir == config.cache_dir / "images"


def test_repeated_model_flags_are_warm_models(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [m.model_id for m in load_config(["--model", "a/b", "--model", "c/d"]).models] == ["a/b", "c/d"]
    monkeypatch.setenv("T2I_ORCHESTRATOR_MODEL", "e/f, g/h")
    assert [m.model_id for m in load_config([]).models] == ["e/f", "g/h"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "eighty"], "--port"),
        (["--image-ttl", "0"], "above 0"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--model", "a/b", "--model", "a/b"], "listed twice"),
        (["--config", "/nonexistent.toml"], "cannot read"),
    ],
)
def test_bad_settings_are_clear_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_unknown_config_file_key_is_an_error(tmp_path: Path) -> None:
    config_file = tmp_path / "orchestrator.json"
    config_file.write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError, match="unknown option.*prot"):
        load_config(["--config", str(config_file)])


def test_models_file_in_livepeer_shape(tmp_path: Path) -> None:
    models = tmp_path / "aiModels.json"
    models.write_text(
        json.dumps(
            [
                {"pipeline": "text-to-image", "model_id": "stabilityai/sd-turbo", "warm": True, "price_per_unit": 4768371},
                {
                    "pipeline": "text-to-image",
                    "model_id": "ByteDance/SDXL-Lightning",
                    "capacity": 2,
                    "optimization_flags": {"TORCH_COMPILE": True, "BFLOAT16": False},
                },
            ]
        )
    )
    turbo, lightning = load_models_file(models)
    assert turbo == ModelSpec("stabilityai/sd-turbo", warm=True)
    assert lightning.capacity == 2 and lightning.optimization_flags == frozenset({"TORCH_COMPILE"})
    assert load_config(["--models", str(models)]).models == (turbo, lightning)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not valid JSON"),
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ("[1]", "entry 0: must be an object"),
        ('[{"pipeline": "text-to-image"}]', "model_id"),
        ('[{"pipeline": "image-to-image", "model_id": "a"}]', "Only 'text-to-image'"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "warm": "very"}]', "warm"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "warm": "yes"}]', "warm"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "warm": 1}]', "warm"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "optimization_flags": {"ATTENTION_SLICING": "yes"}}]', "ATTENTION_SLICING"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "colour": 1}]', "colour"),
        ('[{"pipeline": "text-to-image", "model_id": "a", "optimization_flags": {"SFAST": true}}]', "SFAST"),
        ('[{"pipeline": "text-to-image", "model_id": "a"}, {"pipeline": "text-to-image", "model_id": "a", "warm": true}]', "twice"),
    ],
)
def test_bad_models_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    models = tmp_path / "models.json"
    models.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_models_file(models)


def profile(model_id: str, **keys: object) -> ModelProfile:
    return profile_for(ModelSpec(model_id, **keys))  # type: ignore[arg-type]


def test_model_profiles_follow_livepeer_runner_rules() -> None:
    assert profile("stabilityai/sdxl-turbo").fixed_guidance == 0.0
    assert profile("ByteDance/SDXL-Lightning-4step").fixed_steps == 4
    assert profile("ByteDance/SDXL-Lightning").fixed_steps == 8
    assert profile("ByteDance/SDXL-Lightning").loader == "sdxl-lightning"
    flux = profile("black-forest-labs/FLUX.1-schnell")
    assert flux.dtype == "bfloat16" and not flux.negative_prompt
    assert profile(DEMO_MODEL_ID).default_guidance == 0.0
    assert profile("runwayml/stable-diffusion-v1-5").default_steps == 25


def test_a_fine_tune_under_another_name_says_whose_rules_apply() -> None:
    assert profile("me/my-turbo").fixed_guidance is None
    assert profile("me/my-turbo", family="turbo").fixed_guidance == 0.0
    assert profile("me/my-lightning-unet", family="sdxl-lightning-2step").loader == "sdxl-lightning"
    tuned = profile("me/photoreal", default_steps=12, default_guidance=4.0)
    assert (tuned.default_steps, tuned.default_guidance) == (12, 4.0)
    assert profile("black-forest-labs/FLUX.1-dev", default_steps=20).default_steps == 20


@pytest.mark.parametrize(
    ("family", "device", "dtype"),
    [
        (None, "cuda", "float16"),  # SD 1.x/2.x, SDXL, turbo, Lightning
        ("turbo", "cuda:1", "float16"),
        ("sdxl-lightning-4step", "cuda", "float16"),
        ("flux-schnell", "cuda", "bfloat16"),
        ("flux-dev", "cuda", "bfloat16"),
        ("flux-dev", "cpu", "float32"),  # half precision on a CPU is slow or unsupported: always float32
        (None, "cpu", "float32"),
    ],
)
def test_the_dtype_each_family_gets(family: str | None, device: str, dtype: str) -> None:
    assert dtype_for(ModelSpec("some/model", family=family), device) == dtype


def test_the_models_file_can_force_a_dtype_or_bfloat16() -> None:
    assert dtype_for(ModelSpec("a/b", dtype="float32"), "cuda") == "float32"
    assert dtype_for(ModelSpec("a/b", optimization_flags=frozenset({"BFLOAT16"})), "cuda") == "bfloat16"


def test_models_file_keys_for_operators_own_files(tmp_path: Path) -> None:
    base, unet = tmp_path / "sdxl-base", tmp_path / "sdxl_lightning_4step_unet.safetensors"
    base.mkdir()
    unet.write_bytes(b"")
    models = tmp_path / "models.json"
    models.write_text(
        json.dumps(
            [
                {"pipeline": "text-to-image", "model_id": "ByteDance/SDXL-Lightning-4step", "path": str(base), "unet_path": str(unet)},
                {"pipeline": "text-to-image", "model_id": "me/turbo-tune", "family": "turbo", "variant": "fp16"},
                {"pipeline": "text-to-image", "model_id": "me/slow", "default_steps": 40, "default_guidance": 6},
            ]
        )
    )
    lightning, turbo, slow = load_config(["--models", str(models)]).models
    assert (lightning.path, lightning.unet_path) == (str(base), str(unet))
    assert (turbo.family, turbo.variant) == ("turbo", "fp16")
    assert (slow.default_steps, slow.default_guidance) == (40, 6.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"family": "sdxl"}, "family"),
        ({"model_id": "ByteDance/SDXL-Lightning-4step", "default_steps": 8}, "exactly 4 steps"),
        ({"unet_path": "/x.safetensors"}, "Only SDXL-Lightning"),
        ({"variant": "fp16 ; rm"}, "variant"),
        ({"default_steps": 0}, "default_steps"),
    ],
)
def test_bad_model_keys_are_clear_errors(tmp_path: Path, entry: dict, message: str) -> None:
    models = tmp_path / "models.json"
    models.write_text(json.dumps([{"pipeline": "text-to-image", "model_id": "a/b", **entry}]))
    with pytest.raises(ConfigError, match=message):
        load_models_file(models)


def test_a_model_folder_that_does_not_exist_stops_the_node_at_start(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    models.write_text(json.dumps([{"pipeline": "text-to-image", "model_id": "a/b", "path": str(tmp_path / "missing")}]))
    with pytest.raises(ConfigError, match=r"model a/b: its path .*missing does not exist"):
        load_config(["--models", str(models)])


def test_safety_checker_and_lora_settings() -> None:
    config = load_config([])
    assert config.safety_checker == "CompVis/stable-diffusion-safety-checker" and config.lora_hub == "cached"
    config = load_config(["--safety-checker", "none", "--lora-hub", "nerijs/*", "--lora-max-mb", "8"])
    assert config.safety_checker is None and config.lora_hub == "nerijs/*" and config.lora_max_bytes == 8 * 2**20


async def test_sweeper_removes_only_expired_image_folders(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60)
    old_id, _ = await store.save([Image.new("RGB", (1, 1))])
    young_id, [young_name] = await store.save([Image.new("RGB", (1, 1))])
    (tmp_path / "not-ours").mkdir()
    long_ago = time.time() - 120
    for path in [tmp_path / old_id, *(tmp_path / old_id).iterdir(), tmp_path / "not-ours"]:
        os.utime(path, (long_ago, long_ago))
    assert await store.sweep() == 1
    assert not (tmp_path / old_id).exists()
    assert (tmp_path / "not-ours").exists()
    found = await store.find(young_id, young_name, "png")
    assert found == tmp_path / young_id / f"{young_name}.png" and found.read_bytes().startswith(b"\x89PNG")  # encoded as PNG
    assert [path.name for path in (tmp_path / young_id).iterdir()] == [f"{young_name}.png"]  # no partial file left


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--secret", "change-me-node-secret"], "--secret is the placeholder from the examples; make a real one: openssl rand -hex 32"),
        (["--secret", "CHANGE-ME-node-secret-0123456789abcdef"], "--secret is the placeholder from the examples"),
        (["--secret", "short"], "--secret is 5 characters; use at least 32: openssl rand -hex 32"),
    ],
)
def test_a_placeholder_or_short_secret_stops_the_daemons(argv: list[str], message: str) -> None:
    from t2i_gateway.config import load_config as load_gateway_config

    with pytest.raises(ConfigError, match=message):
        load_config(argv)
    gateway_argv = ["--orchestrator", "http://n:1", argv[0].replace("--secret", "--stream-secret"), argv[1]]
    with pytest.raises(ConfigError, match=message.replace("--secret", "--stream-secret")):
        load_gateway_config(gateway_argv)
    with pytest.raises(ConfigError, match="--orchestrator-secret is"):
        load_gateway_config(["--orchestrator", "http://n:1", "--orchestrator-secret", argv[1]])


def test_secrets_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i_gateway.config import load_config as load_gateway_config

    secret = tmp_path / "secret"
    secret.write_text("from-a-file-0123456789abcdef0123456\n")
    assert load_config(["--secret-file", str(secret)]).secret == "from-a-file-0123456789abcdef0123456"
    monkeypatch.setenv("T2I_ORCHESTRATOR_SECRET", "from-the-environment-0123456789abcdef")
    assert load_config([]).secret == "from-the-environment-0123456789abcdef"
    gateway = load_gateway_config(
        ["--orchestrator", "http://n:1", "--orchestrator-secret-file", str(secret), "--stream-secret-file", str(secret)]
    )
    assert gateway.orchestrator_secret == gateway.stream_secret == "from-a-file-0123456789abcdef0123456"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(["--secret-file", str(tmp_path / "empty")])


def weights(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("files", "device", "variant"),
    [
        (["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"], "cpu", "fp16"),
        (["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"], "cpu", None),
        (["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"], "cuda", "fp16"),
        (["unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"], "cpu", "fp16"),
        (["unet/diffusion_pytorch_model-00001-of-00002.safetensors"], "cuda", None),
        (["transformer/diffusion_pytorch_model.safetensors"], "cuda", None),
    ],
)
def test_half_precision_files_are_found_without_configuration(tmp_path: Path, files: list[str], device: str, variant: str | None) -> None:
    from t2i_orchestrator.model_files import locate

    folder = weights(tmp_path / "model", *files)
    assert locate(ModelSpec("a/b", path=str(folder)), device).variant == variant
    assert locate(ModelSpec("a/b", path=str(folder), variant="bf16"), device).variant == "bf16"  # the models file decides


def test_listen_fd_must_be_an_open_tcp_socket(tmp_path: Path) -> None:
    from t2i_common.server import inherited_socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        inherited = inherited_socket(os.dup(sock.fileno()))
        assert inherited.getsockname() == sock.getsockname()
        inherited.close()
    with (tmp_path / "file").open("w") as file, pytest.raises(ConfigError, match=r"--listen-fd \d+: not an open socket"):
        inherited_socket(file.fileno())
    with pytest.raises(ConfigError, match="--listen-fd 12345: not an open socket"):
        inherited_socket(12345)
    assert load_config(["--listen-fd", "7", "--port", "9001"]).listen_fd == 7


async def test_the_sweep_empties_and_removes_an_earlier_versions_per_port_folders(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ttl_s=60)
    legacy = ImageStore(tmp_path / "41234", ttl_s=60)  # where an earlier version's node on port 41234 wrote
    old_id, _ = await legacy.save([Image.new("RGB", (1, 1))])
    young_id, _ = await ImageStore(tmp_path / "41235", ttl_s=60).save([Image.new("RGB", (1, 1))])
    (tmp_path / "41236" / "not-ours").mkdir(parents=True)
    long_ago = time.time() - 120
    for path in [tmp_path / "41234" / old_id, *(tmp_path / "41234" / old_id).iterdir()]:
        os.utime(path, (long_ago, long_ago))
    assert await store.sweep() == 1
    assert not (tmp_path / "41234").exists()  # emptied, then removed
    assert (tmp_path / "41235" / young_id).is_dir() and (tmp_path / "41236" / "not-ours").is_dir()


def test_the_advertised_url_is_stored_as_checked() -> None:
    # What the registry entry, the reports and the leave carry: one spelling, the one gateways use.
    assert load_config(["--advertise-url", " http://10.0.0.5:8936/ "]).advertise_url == "http://10.0.0.5:8936"
