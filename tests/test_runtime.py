import os
import subprocess
import sys

import pytest

from tfxfer.errors import TfxferError
from tfxfer.runtime import precision_reason, resolve_precision

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    "flags, gpus, expected",
    [
        (AVX2, [], "float32"),  # bf16 is emulated on AVX2: slower than float32
        (SAPPHIRE_RAPIDS, [], "mixed_bfloat16"),
        (AVX2 | {"avx512f"}, [], "float32"),  # AVX-512 without BF16
        (AVX2, [(8, 0)], "mixed_bfloat16"),  # A100
        (SAPPHIRE_RAPIDS, [(7, 5)], "float32"),  # a T4 decides, not the host CPU
        (AVX2, [(9, 0), (7, 0)], "float32"),  # every GPU must have bf16
    ],
)
def test_auto_precision_follows_the_hardware(flags, gpus, expected):
    assert resolve_precision("auto", flags=flags, gpu_capabilities=gpus) == expected


def test_the_start_line_says_why_auto_chose():
    assert precision_reason("auto", SAPPHIRE_RAPIDS, []) == (
        "auto: the CPU has amx_bf16, avx512_bf16, where bfloat16 trains faster than float32")
    assert precision_reason("auto", AVX2, [(8, 6)]).startswith("auto: every GPU has compute capability 8.0")
    assert "emulating it is slower" in precision_reason("auto", AVX2, [])
    assert precision_reason("float32", SAPPHIRE_RAPIDS, []) == "as asked"


def test_explicit_precision_is_kept_and_unknown_is_one_sentence():
    assert resolve_precision("mixed_bfloat16", flags=AVX2, gpu_capabilities=[]) == "mixed_bfloat16"
    with pytest.raises(TfxferError, match="did you mean 'mixed_bfloat16'"):
        resolve_precision("mixed_bfloat1")


def _python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


REPORT = "import os, tfxfer.runtime as r; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), r.onednn_enabled())"


@pytest.mark.slow
def test_import_tfxfer_turns_onednn_on_unless_the_user_chose():
    assert _python("import tfxfer; " + REPORT).stdout.split() == ["1", "True"]
    assert _python("import tfxfer; " + REPORT, TF_ENABLE_ONEDNN_OPTS="0").stdout.split() == ["0", "False"]


def test_tensorflow_imported_first_gets_one_warning_where_onednn_is_off():
    result = _python("import warnings; warnings.simplefilter('always'); import tensorflow; import tfxfer; " + REPORT)
    variable, enabled = result.stdout.split()
    assert variable == "None"  # too late to set: TensorFlow read it at import
    warned = "import tfxfer first or set TF_ENABLE_ONEDNN_OPTS=1" in result.stderr
    # AVX-512 VNNI/AMX CPUs have oneDNN on by default: nothing to say there.
    assert warned == (enabled == "False")
    assert result.stderr.count("import tfxfer first") <= 1


@pytest.mark.slow
def test_import_tfxfer_is_quiet_unless_the_user_asks_for_level_0():
    # The usual way to quiet TensorFlow, level 1 or 2, must not bring back the lines
    # it prints before its logging starts (absl's pre-init warning, cudart, oneDNN).
    for level in (None, "1", "2"):
        stderr = _python("import tfxfer", **({} if level is None else {"TF_CPP_MIN_LOG_LEVEL": level})).stderr
        assert "oneDNN custom operations" not in stderr and "absl::InitializeLog" not in stderr, level
    assert "oneDNN custom operations" in _python("import tfxfer", TF_CPP_MIN_LOG_LEVEL="0").stderr


def test_replayed_on_failure_holds_output_back_and_shows_it_when_the_block_fails(capfd):
    from tfxfer.runtime import replayed_on_failure

    def chatter():
        os.write(2, b"native line on fd 2\n")
        os.write(1, b"native line on fd 1\n")
        print("python print")
        print("python to stderr", file=sys.stderr)

    with replayed_on_failure():
        chatter()
    assert capfd.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="conversion failed"):
        with replayed_on_failure():
            chatter()
            raise RuntimeError("conversion failed")
    out, err = capfd.readouterr()
    assert out == ""
    for line in ("native line on fd 2", "native line on fd 1", "python print", "python to stderr"):
        assert line in err, err
    print("after")  # the streams are back
    assert capfd.readouterr().out == "after\n"
