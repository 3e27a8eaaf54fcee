"""CPU defaults (lpt_jax.platform): never override the user, apply only to CPU runs."""

from lpt_jax import platform


def test_merge_never_overrides_a_users_flag():
    merged = platform.merged_xla_flags("--a=1 --b=2", "--a=9 --c=3")
    assert merged == "--a=1 --b=2 --c=3"
    assert platform.merged_xla_flags("--a=1", "") == "--a=1"


def test_cpu_detection_follows_jax_platforms():
    assert platform.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not platform.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not platform.runs_on_cpu({"JAX_PLATFORMS": "tpu"})


def test_configure_applies_measured_flags_only_where_allowed(monkeypatch):
    monkeypatch.setattr(platform, "CPU_XLA_FLAGS", {"xla_cpu_some_option": "true"})
    monkeypatch.setattr(platform, "_backends_started", lambda: False)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert platform.configure_for_cpu(env) == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_some_option=true")
    assert env["XLA_FLAGS"].endswith("--xla_cpu_some_option=true")
    user = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_some_option=false"}
    assert platform.configure_for_cpu(user) == "--xla_cpu_some_option=false"
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert platform.configure_for_cpu(gpu) == "" and "XLA_FLAGS" not in gpu
    off = {"JAX_PLATFORMS": "cpu", "LPT_NO_CPU_DEFAULTS": "1"}
    assert platform.configure_for_cpu(off) == "" and "XLA_FLAGS" not in off
    monkeypatch.setattr(platform, "_backends_started", lambda: True)
    late = {"JAX_PLATFORMS": "cpu"}
    assert platform.configure_for_cpu(late) == "" and "XLA_FLAGS" not in late


def test_shipped_default_is_the_measured_one():
    # benchmarks/results/xla_cpu_flags.md: no option beat XLA's default on jaxlib 0.10.2
    assert platform.cpu_xla_flags() == ""
