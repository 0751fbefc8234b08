"""Shards without a usable sample: `lcm distill` refuses them in one line, without the log line of the throwaway reader
that found out (`shards.check_usable`)."""

import io
import tarfile

from PIL import Image


def test_shards_without_a_usable_sample_are_refused_in_one_line(tiny_sd, run_error, tmp_path):
    # defect: "shards of rank 0/1 (...): no_caption x1 (.../00000.tar:0)" came above the one-line error, which sums it up
    (tmp_path / "shards").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for i in range(3):
            member = tarfile.TarInfo(f"{i}.png")
            member.size = len(png.getvalue())
            tar.addfile(member, io.BytesIO(png.getvalue()))
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(tmp_path / "shards"),
                           "--out", str(tmp_path / "run"), "--omega-response-samples", "0"])
    assert code == 2 and len(err.splitlines()) == 1 and "no usable sample" in err and "no_caption=3" in err, err
