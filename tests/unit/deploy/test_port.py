"""Weight import: exactness against torchvision and a torch-built student, formats,
strictness, download and `rdjax port`.

TOL = 1e-4 of the largest feature, float32 forward through a whole network (up to
~100 layers): each layer adds rounding of order sqrt(n) * 2^-24 ~ 1e-6 relative, so
the accumulated difference from torch's own float32 rounding stays near 1e-5 whatever
either library's CPU kernels sum in; a wrong port (a transposed kernel, swapped BN
statistics) is off by order 1."""

from __future__ import annotations

import copy
import functools
import http.server
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from rdjax.errors import PortError
from rdjax.models.rd4ad import RD4AD
from rdjax.models.resnet import ARCHS, IMAGENET_FILES
from rdjax.runtime import weights
from rdjax.runtime import workdir as workdir_lib
from rdjax.train import teacher

from conftest import nchw_to_nhwc, randomize_batchnorm, rdjax_cli, rel_err, restore_state, state_dict_numpy
from torch_reference import TorchDecoder, TorchOCBE, official_state_dict, teacher_features

TOL = 1e-4  # max |diff| / max |torch|, float32


@functools.cache
def torch_teacher(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    randomize_batchnorm(model, seed=1)
    return model.eval()


def _compare_teacher(arch: str, size: int, batch: int) -> float:
    ref = torch_teacher(arch)
    teacher_vars = RD4AD(arch).port_teacher(state_dict_numpy(ref))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = [nchw_to_nhwc(f) for f in teacher_features(ref, x)]
    ours = RD4AD(arch).teacher_features(teacher_vars, jnp.asarray(nchw_to_nhwc(x)))
    errs = []
    for o, w in zip(ours, want):
        assert o.shape == w.shape
        errs.append(rel_err(o, w))
    print(f"{arch} @ {size}px: rel err per scale {errs}")
    return max(errs)


# The bottleneck backbones take most of this file's time: they run in the slow tier.
ALL_ARCHS = [a if a in ("resnet18", "resnet34") else pytest.param(a, marks=pytest.mark.slow) for a in sorted(ARCHS)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_teacher_matches_torchvision(arch):
    assert _compare_teacher(arch, size=64, batch=2) <= TOL


@pytest.mark.slow
def test_wide_resnet50_teacher_matches_torchvision_at_256():
    assert _compare_teacher("wide_resnet50_2", size=256, batch=2) <= TOL


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_student_matches_torch_reference(arch):
    """OCBE + decoder ported from an official-format checkpoint equal a torch student built
    from torchvision blocks, in eval mode and in train mode (batch statistics)."""
    torch.manual_seed(5)
    ocbe, decoder = TorchOCBE(arch), TorchDecoder(arch)
    randomize_batchnorm(ocbe, 6)
    randomize_batchnorm(decoder, 7)
    sd = official_state_dict(ocbe, decoder)
    sd["bn"]["memory_bank"] = torch.zeros(3)  # the official test code drops 'memory' keys
    flat = {f"{k}.{n}": t.numpy() for k, v in sd.items() for n, t in v.items()}
    student_vars = RD4AD(arch).port_official(flat)
    model = RD4AD(arch)
    g = torch.Generator().manual_seed(8)
    c = get_channels(arch)
    feats = [
        torch.randn(2, ch, s, s, generator=g) for ch, s in zip(c, (32, 16, 8))
    ]  # 128 px: enough samples per channel for train-mode BN
    jfeats = tuple(jnp.asarray(nchw_to_nhwc(f)) for f in feats)
    for train in (False, True):
        ocbe.train(train)
        decoder.train(train)
        with torch.no_grad():
            want = decoder(ocbe(feats))
            # Deep train-mode BatchNorm at a small batch is ill-conditioned: judge against a
            # float64 run, allowing what torch's own float32 run deviates from it (x2).
            exact = copy.deepcopy(decoder).double()(copy.deepcopy(ocbe).double()([f.double() for f in feats]))
        ours, _ = model.student_features(student_vars, jfeats, train=train)
        for o, w, e in zip(ours, want, exact):
            assert o.shape == nchw_to_nhwc(w).shape
            if train:
                allowed = max(TOL, 2 * rel_err(nchw_to_nhwc(w), nchw_to_nhwc(e)))
                assert rel_err(o, nchw_to_nhwc(e)) <= allowed, (arch, train)
            else:
                assert rel_err(o, nchw_to_nhwc(w)) <= TOL, (arch, train)


def get_channels(arch: str) -> tuple[int, int, int]:
    return ARCHS[arch].feature_channels


def test_safetensors_and_pth_give_identical_variables(tmp_path):
    from safetensors.torch import save_file

    ref = torch_teacher("resnet18")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **state_dict_numpy(ref))
    variants = [
        RD4AD("resnet18").port_teacher(weights.read_state_dict(tmp_path / f"w.{ext}"))
        for ext in ("pth", "safetensors", "npz")
    ]
    for other in variants[1:]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, variants[0], other)


def test_official_checkpoint_pth_roundtrip(tmp_path):
    torch.manual_seed(1)
    ocbe, decoder = TorchOCBE("resnet18"), TorchDecoder("resnet18")
    torch.save(official_state_dict(ocbe, decoder), tmp_path / "ckpt.pth")
    student_vars = RD4AD("resnet18").port_official(weights.read_state_dict(tmp_path / "ckpt.pth"))
    np.testing.assert_array_equal(
        student_vars["params"]["ocbe"]["conv1"]["kernel"], ocbe.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        student_vars["params"]["decoder"]["layer1_0"]["conv1"]["transposed_kernel"],
        decoder.layer1[0].conv1.weight.detach().numpy().transpose(2, 3, 0, 1),
    )


def test_strictness_names_the_key():
    sd = state_dict_numpy(torch_teacher("resnet18"))
    missing = dict(sd)
    del missing["layer2.0.conv1.weight"]
    with pytest.raises(PortError, match=r"missing key 'layer2.0.conv1.weight' \(expected shape \(128, 64, 3, 3\)\)"):
        RD4AD("resnet18").port_teacher(missing)
    extra = dict(sd, **{"layer3.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortError, match=r"unexpected key 'layer3.0.extra.weight' with shape \(3,\)"):
        RD4AD("resnet18").port_teacher(extra)
    bad = dict(sd, **{"bn1.weight": np.zeros(65, np.float32)})
    with pytest.raises(PortError, match=r"key 'bn1.weight' has shape \(65,\), expected \(64,\)"):
        RD4AD("resnet18").port_teacher(bad)
    # fc, layer4 and num_batches_tracked are ignored on purpose: sd has all three.
    assert any(k.startswith("layer4.") for k in sd) and "fc.weight" in sd


def test_wrong_architecture_is_reported():
    sd = state_dict_numpy(torch_teacher("resnet18"))
    with pytest.raises(PortError, match="is this a resnet34 teacher file"):
        RD4AD("resnet34").port_teacher(sd)


def test_truncated_file_is_reported(tmp_path):
    ref = torch_teacher("resnet18")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PortError, match=r"cut.pth: cannot read weights"):
        weights.read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(PortError, match=r"cut.safetensors: cannot read weights"):
        weights.read_state_dict(tmp_path / "cut.safetensors")


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as where it is not installed
    with pytest.raises(PortError, match=r"w.pth: reading .pth/.pt files needs PyTorch"):
        weights.read_state_dict(tmp_path / "w.pth")


def _fake_imagenet_file(directory: Path, arch: str, good_hash: bool = True) -> Path:
    """A torchvision-style file whose name carries its own SHA-256 prefix, like the real ones."""
    import hashlib

    ref = torch_teacher(arch)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "tmp.pth"
    torch.save(ref.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    target = directory / IMAGENET_FILES[arch]
    os.replace(tmp, target)
    return target, digest


def test_download_over_http_verifies_hash(tmp_path, monkeypatch):
    served = tmp_path / "served"
    target, digest = _fake_imagenet_file(served, "resnet18")
    monkeypatch.setitem(IMAGENET_FILES, "resnet18", f"resnet18-{digest}.pth")
    os.replace(target, served / f"resnet18-{digest}.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RDJAX_WEIGHTS_BASE_URL", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setenv("RDJAX_CACHE_DIR", str(tmp_path / "cache"))
        variables = teacher.from_source(RD4AD("resnet18"), "imagenet")
    finally:
        server.shutdown()
    assert (tmp_path / "cache" / f"resnet18-{digest}.pth").is_file()
    want = RD4AD("resnet18").port_teacher(state_dict_numpy(torch_teacher("resnet18")))
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, want)


def test_download_rejects_bad_hash_and_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "served"
    target, _ = _fake_imagenet_file(served, "resnet18")
    monkeypatch.setitem(IMAGENET_FILES, "resnet18", "resnet18-00000000.pth")
    os.replace(target, served / "resnet18-00000000.pth")
    monkeypatch.setenv("RDJAX_WEIGHTS_BASE_URL", served.as_uri())
    with pytest.raises(PortError, match="does not start with '00000000'"):
        weights.download(IMAGENET_FILES["resnet18"], tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_download_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RDJAX_WEIGHTS_BASE_URL", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(PortError) as info:
        weights.download(IMAGENET_FILES["wide_resnet50_2"], tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"place it at {tmp_path / 'wide_resnet50_2-95faca4d.pth'}" in msg


def test_cli_teacher_writes_orbax_checkpoint(tmp_path):
    ref = torch_teacher("resnet18")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    result = rdjax_cli("port", "teacher", "--arch=resnet18", f"--src={tmp_path / 'w.pth'}", f"--out={tmp_path / 't'}")
    assert result.code == 0, result.stderr
    restored = workdir_lib.restore_teacher(tmp_path / "t", "resnet18")
    want = RD4AD("resnet18").port_teacher(state_dict_numpy(ref))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, want)
    with pytest.raises(workdir_lib.WorkdirError, match="holds a resnet18 teacher, but the model is resnet34"):
        workdir_lib.restore_teacher(tmp_path / "t", "resnet34")
    # An existing output is refused, not overwritten.
    again = rdjax_cli("port", "teacher", "--arch=resnet18", f"--src={tmp_path / 'w.pth'}", f"--out={tmp_path / 't'}")
    assert "already exists" in again.error_line()


def test_cli_teacher_wrong_arch_is_one_line_error(tmp_path):
    torch.save(torch_teacher("resnet18").state_dict(), tmp_path / "w.pth")
    result = rdjax_cli("port", "teacher", "--arch=resnet50", f"--src={tmp_path / 'w.pth'}", f"--out={tmp_path / 't'}")
    assert "is this a resnet50 teacher file" in result.error_line()
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_cli_model_without_teacher_or_with_a_bad_size_writes_nothing(tmp_path):
    torch.save({}, tmp_path / "c.pth")  # read first: a checkpoint may hold its teacher (Dinomaly's)
    result = rdjax_cli("port", "rd4ad", "--arch=resnet18", f"--src={tmp_path / 'c.pth'}", f"--out={tmp_path / 'w'}")
    assert "needs --teacher" in result.error_line()
    result = rdjax_cli(
        "port",
        "rd4ad",
        "--arch=resnet18",
        "--teacher=imagenet",
        f"--src={tmp_path / 'c.pth'}",
        f"--out={tmp_path / 'w'}",
        "--image_size=100",
    )
    assert "not a multiple of 32" in result.error_line()
    assert "'teacher' or a model name" in rdjax_cli("port", "--arch=resnet18", "--src=x", "--out=y").error_line()
    assert not (tmp_path / "w").exists()


def test_port_command_writes_a_restorable_workdir(tmp_path):
    """`rdjax port rd4ad` writes a workdir that restores and predicts."""
    torch.manual_seed(2)
    ocbe, decoder = TorchOCBE("resnet18"), TorchDecoder("resnet18")
    torch.save(official_state_dict(ocbe, decoder), tmp_path / "ckpt.pth")
    torch.save(torch_teacher("resnet18").state_dict(), tmp_path / "w.pth")
    out = tmp_path / "work"
    result = rdjax_cli(
        "port",
        "rd4ad",
        "--arch=resnet18",
        f"--teacher={tmp_path / 'w.pth'}",
        f"--src={tmp_path / 'ckpt.pth'}",
        f"--out={out}",
        "--image_size=64",
    )
    assert result.code == 0, result.stderr
    config = workdir_lib.load_config(out)
    assert config.model.arch == "resnet18" and config.model.name == "rd4ad" and config.image_size == 64
    workdir_lib.restore_teacher(config.model.teacher_weights, "resnet18")
    state, step = restore_state(out)
    assert step == 0
    want = RD4AD("resnet18").port_official(weights.read_state_dict(tmp_path / "ckpt.pth"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.student_vars, want)
