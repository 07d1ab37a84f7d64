"""Only what matters reaches the user: no orbax "Metadata file does not exist" on restore, no TFDS "Downloading and
preparing dataset Unknown size" or terminal escape codes from `build`, no TFDS "OpenCV is not installed" advice."""

import json

import pytest
from conftest import SHARED_DATA, run_python

NOISE = ("Metadata file does not exist", "Unknown size", "downloaded and prepared", "OpenCV", "\x1b[")


@pytest.mark.slow  # a fresh interpreter: jax, orbax and TFDS imports, one BTCV build
def test_restore_build_and_image_decoding_are_quiet(tmp_path):
    btcv = SHARED_DATA / "layouts" / "btcv"
    build = (f'main(["build", "btcv", "--manual-dir", {str(btcv)!r}, "--data-dir", {str(tmp_path / "tfds")!r}, '
             f'"--config", "selfmedmae"])' if btcv.is_dir() else "")
    proc = run_python(f"""
        import io, logging
        import numpy as np
        import tensorflow_datasets as tfds
        from PIL import Image
        from medmae_jax.main import main
        from medmae_jax.train import checkpoint as ckpt

        {build}
        mngr = ckpt.manager({str(tmp_path / "run")!r}, keep=1, async_save=False)
        ckpt.save(mngr, 1, {{"params": {{"w": np.zeros(2, np.float32)}}}}, {{"step": 1}}, force=True)
        mngr.wait_until_finished()
        mngr.close()
        params, meta = ckpt.restore_params({str(tmp_path / "run")!r})
        assert meta["step"] == 1 and params["w"].shape == (2,)
        png = io.BytesIO()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
        assert tfds.features.Image(shape=(4, 4, 1)).decode_example_np(png.getvalue()).shape == (4, 4, 1)
        print("done")
    """)
    assert proc.stdout.strip().splitlines()[-1] == "done"
    if btcv.is_dir():
        assert json.loads(proc.stdout.strip().splitlines()[0])["splits"] == {"validation": 2}  # stdout: JSON first
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stdout, proc.stderr)
