"""`lcm finetune --model LCM --data MY_FOLDER`: a user's own folder of images, laid out as real folders are (Hugging Face
imagefolder's metadata.csv, images smaller than the training resolution), from the folder to the exported LCM."""

import contextlib
import io

from PIL import Image

from latent_consistency.cli import main
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import SkipCounter, decode_rgb, load_rgb

R = 16


def write_csv_folder(folder, rows, header="file_name,text"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (R, R), (60 * i, 120, 30)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text(header + "\n" + "".join(row + "\n" for row in rows), encoding="utf-8")
    return folder


def test_a_folder_with_hugging_faces_metadata_csv_is_read_and_fine_tuned_on(tiny_lcm, tmp_path):
    """Hugging Face imagefolder's other metadata format: a header row and a row per image, CSV-quoted captions (a comma,
    a line break, unicode); a row that does not fit the header is one bad row.
    was: metadata.csv was not read: every image counted as having no caption and the run refused "no usable captioned
    image ... give each image a caption" for a folder whose every image had one."""
    data = write_csv_folder(tmp_path / "train", ['0.png,"a cat, sitting"', '1.png,"zwei Kätzchen ☃\nauf einer Matte"',
                                                 "2.png,a dog,extra column"])
    dataset = ImageFolderDataset(data, R)
    assert dataset.samples == [("0.png", "a cat, sitting"), ("1.png", "zwei Kätzchen ☃\nauf einer Matte")]
    assert dataset.skipped.counts == {"bad_metadata": 1, "no_caption": 1}  # the row of three values; 2.png then has no caption
    assert ("bad_metadata", f"{data / 'metadata.csv'}:5") in dataset.skipped.seen  # header, a row, a row of two lines, then line 5
    # the columns in any order, the caption under "caption"
    assert ImageFolderDataset(write_csv_folder(tmp_path / "c2", ["a cat,0.png"], header="caption,file_name"), R).samples == [
        ("0.png", "a cat")]
    out = tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--model", str(tiny_lcm), "--data", str(data), "--out", str(out)]) == 0
    assert (out / "lcm" / "model_index.json").is_file()


def test_metadata_in_a_subfolder_or_two_metadata_files_are_one_line_errors(tiny_lcm, tmp_path, run_error):
    """was: a Hugging Face layout given by its parent (data/ holding train/metadata.jsonl) was refused as a folder of
    uncaptioned images without naming the metadata file that was passed over; a folder with both metadata.jsonl and
    metadata.csv read the .jsonl alone, without a word about the other."""
    nested = write_csv_folder(tmp_path / "data" / "train", ["0.png,a cat"])
    out = tmp_path / "run"
    code, err = run_error(["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(nested.parent), "--out", str(out)])
    err = err.splitlines()[-1]  # after the data's log of what it skipped
    assert code == 2 and err.startswith("lcm finetune: error: "), err
    assert "train/metadata.csv is read only at the root of the data: pass its folder as the data" in err, err
    both = write_csv_folder(tmp_path / "both", ["0.png,a cat"])
    (both / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "a dog"}\n')
    code, err = run_error(["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(both), "--out", str(out)])
    assert code == 2 and len(err.splitlines()) == 1 and "holds both metadata.jsonl and metadata.csv" in err, err
    assert not out.exists()
    bad = write_csv_folder(tmp_path / "no-file-name", ["0.png,a cat"], header="image,text")
    code, err = run_error(["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(bad), "--out", str(out)])
    assert code == 2 and len(err.splitlines()) == 1 and 'has no "file_name" column' in err, err
    assert not out.exists()


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_smaller_than_the_resolution_is_counted_as_upscaled(tmp_path):
    """A thumbnail among photos is scaled up to the training resolution (blurred): the data summary says how many were.
    was: a 5 x 7 image trained at 16 px was upscaled 3.2x without a word (an 8-bit RGB one reported no reason at all)."""
    from latent_consistency.data.images import decode_rgb_reasons  # new with the fix

    image, reasons = decode_rgb_reasons(png(Image.new("RGB", (5, 7), (255, 0, 0))), R)
    assert image.shape == (3, R, R) and reasons == ["converted_upscaled"]
    assert decode_rgb(png(Image.new("RGB", (5, 7))), R)[1] == "converted_upscaled"
    assert decode_rgb_reasons(png(Image.new("RGBA", (5, 7))), R)[1] == ["converted_alpha", "converted_upscaled"]
    assert decode_rgb_reasons(png(Image.new("RGB", (R, 3 * R))), R)[1] == []  # the shorter side at the resolution: no upscale
    counter = SkipCounter()
    (tmp_path / "small.png").write_bytes(png(Image.new("LA", (8, 40))))
    assert load_rgb(tmp_path / "small.png", R, counter) is not None
    assert counter.summary() == "converted: alpha=1, upscaled=1"


def test_resolution_help_says_how_images_are_cropped(capsys):
    """was: `--resolution` said only "image resolution for image data": nothing of the centre crop (diffusers' LCD scripts
    crop at random), of flips, or of smaller images being upscaled."""
    with contextlib.suppress(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "central square cropped" in text and "no flips" in text and "upscaled" in text


def test_a_paragraph_long_caption_keeps_the_validation_grid_an_image_grid():
    """was: the grid's column captions (the data's first captions when no --validation-prompts are given) were wrapped without
    a limit: one caption of 2,500 characters made a 322 x 5632 px grid, its images a strip at the bottom."""
    import torch

    from latent_consistency.grids import LINE_HEIGHT, MAX_CAPTION_LINES, image_grid

    rows = [torch.zeros(2, 3, R, R)]
    grid = image_grid(rows, ["lcm"], column_labels=["word " * 500, "a cat"])
    assert grid.height <= LINE_HEIGHT * MAX_CAPTION_LINES + 4 + 2 * R


def test_metrics_log_the_learning_rate_each_step_trained_at(tiny_lcm, tmp_path):
    """was: metrics.jsonl logged the scheduler's rate after it had moved on, the next step's: with a 100-step warm-up, step 3
    logged 4e-6 where it trained at 3e-6 (lr 1e-4), and the last step of a cosine schedule logged 0."""
    import json

    from tiny_models import write_captioned_images

    data, out = write_captioned_images(tmp_path / "images", 4), tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--steps", "3", "--model", str(tiny_lcm), "--data", str(data), "--out", str(out),
                 "--lr", "1e-4", "--lr-warmup-steps", "100", "--log-every", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [(r["step"], round(r["lr"], 12)) for r in rows] == [(1, 1e-6), (2, 2e-6), (3, 3e-6)]
