"""A checkpoint holding NaN weights is one clear error (exit 2) naming layer, projection and expert, before any
spectrum is computed (not a LinAlgError traceback from the eigensolver)."""

from lazarus_core.cli.main import main
from lazarus_core.models.safetensors_file import SafetensorsFile


def test_moe_type_analyze_refuses_an_mxfp4_nan_scale(checkpoint_dir, tmp_path, capsys):
    import shutil

    directory = tmp_path / "gpt_oss_mxfp4"
    shutil.copytree(checkpoint_dir("gpt_oss_mxfp4"), directory)
    path = directory / "model.safetensors"
    tensor = "model.layers.0.mlp.experts.down_proj_scales"  # [E=4, H=64, I/32=1]
    with open(path, "r+b") as f:
        f.seek(SafetensorsFile(path).info(tensor).start + 1 * 64 + 9)  # expert 1, down row 9
        f.write(b"\xff")
    out = tmp_path / "r.json"
    capsys.readouterr()  # drop what generating the fixture printed
    rc = main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(directory), "--layers", "all",
               "--no-progress", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lazarus: error:"), err
    assert f"tensor '{tensor}': layer 0, down, expert 1 holds NaN: MXFP4 scale byte 0xFF (NaN in E8M0) at row 9" \
        in lines[0]
    assert "Traceback" not in err and "LinAlgError" not in err and not out.exists()
