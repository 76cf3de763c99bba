"""Multi-device data parallelism and time split over devices, in its own process with 8 host devices."""

import os
import pathlib
import subprocess
import sys

import pytest

import jaxbptt as jb

HERE = pathlib.Path(__file__).resolve().parent


def test_sharded_gradients_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    result = subprocess.run([sys.executable, str(HERE / "sharded_check.py")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded ok" in result.stdout


def test_data_parallel_bad_input():
    import jax

    mesh = jax.make_mesh((1,), ("data",))
    step = jb.elman(2).step
    with pytest.raises(ValueError, match=r"reduce must be 'sum' or 'mean'; got reduce='max'"):
        jb.data_parallel(step, lambda y, t: y.sum(), mesh, reduce="max")
    with pytest.raises(ValueError, match=r"axis_name 'batch' is not an axis of the mesh; its axes are \('data',\)"):
        jb.data_parallel(step, lambda y, t: y.sum(), mesh, "batch")
