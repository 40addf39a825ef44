"""train.precision: honest detection of native bf16, and the mode each setting resolves to."""

import pytest

from pipeline.engine.precision import cpu_has_native_bf16, resolve

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2 vaes\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
NO_BF16_AVX512 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo, native", [(ZEN3, False), (ZEN4, True), (SPR, True), (NO_BF16_AVX512, False),
                                             ("", False)])
def test_native_bf16_comes_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("setting, device, cpuinfo, name, channels_last", [
    ("auto", "cpu", ZEN3, "fp32", True),  # emulated bf16 would be slower: never chosen
    ("auto", "cpu", ZEN4, "bf16", True),
    ("auto", "cuda", ZEN3, "bf16", True),
    ("fp32", "cpu", ZEN4, "fp32", True),
    ("fp32", "cuda", ZEN3, "fp32", True),
    ("bf16", "cpu", ZEN4, "bf16", True),
])
def test_each_setting_resolves_to_one_mode(setting, device, cpuinfo, name, channels_last):
    mode = resolve(setting, device, cpuinfo, {})  # {}: no kernel limits, whatever this process's environment
    assert (mode.name, mode.channels_last) == (name, channels_last)


def test_forcing_bf16_on_a_cpu_without_it_says_so():
    assert "slower" in resolve("bf16", "cpu", ZEN3, {}).reason


@pytest.mark.parametrize("env, restricted", [
    ({}, None),
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2"),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, None),  # ATen's limit: bf16 convolutions and matmuls are oneDNN's
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),  # AVX-512 without its bf16
    ({"DNNL_MAX_CPU_ISA": "avx2"}, "DNNL_MAX_CPU_ISA=AVX2"),
    ({"ONEDNN_MAX_CPU_ISA": "ALL", "DNNL_MAX_CPU_ISA": "AVX2"}, None),  # oneDNN reads ONEDNN_ first
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, None),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, None),
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, None),
])
def test_kernels_held_below_bf16_make_auto_fp32_on_a_bf16_cpu(env, restricted):
    """With torch's CPU kernels held to AVX2 (the bit-for-bit reproduction settings), bf16 would be
    emulated although the processor has it, so `auto` must not pick it, and must say why."""
    mode = resolve("auto", "cpu", ZEN4, env)
    assert mode.name == ("bf16" if restricted is None else "fp32")
    if restricted:
        assert restricted in mode.reason and "emulated" in mode.reason
        assert "slower" in resolve("bf16", "cpu", ZEN4, env).reason
    assert resolve("auto", "cpu", ZEN3, env).name == "fp32" and resolve("auto", "cuda", ZEN4, env).name == "bf16"
