"""Generation and the paper's figures: sizes, style-mixing semantics, noise variation, truncation, CLIs."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from stylegan_dist import figures, generate
from stylegan_dist.metrics.testing import write_checkpoint
from stylegan_dist.networks import build_generator


def make_G(resolution=32, noise=0.0, arch=()):
    torch.manual_seed(0)
    G = build_generator(tiny_config(*arch, resolution=resolution)).eval()
    with torch.no_grad():
        for m in G.modules():
            if getattr(m, "noise_weight", None) is not None:
                m.noise_weight.fill_(noise)
        G.w_avg.normal_()  # so that truncation has a visible target
    return G


def test_style_mixing_ws_copies_the_row_range_from_b():
    L, D = 8, 4
    ws_a = torch.arange(3 * L * D, dtype=torch.float32).view(3, L, D)
    ws_b = -torch.arange(1, 2 * L * D + 1, dtype=torch.float32).view(2, L, D)
    rows = [range(0, 4), range(4, 8), range(0, 4)]
    mixed = figures.style_mixing_ws(ws_a, ws_b, rows)
    assert mixed.shape == (3, 2, L, D)
    for i, r in enumerate(rows):
        for j in range(2):
            for layer in range(L):
                src = ws_b[j] if layer in r else ws_a[i]
                assert torch.equal(mixed[i, j, layer], src[layer])


def test_style_groups_follow_the_paper_and_shrink_with_resolution():
    G = make_G(64)
    assert {k: (r.start, r.stop) for k, r in figures.style_groups(G, 64).items()} == \
        {"coarse": (0, 4), "middle": (4, 8), "fine": (8, 10)}
    assert list(figures.style_groups(G, 32)) == ["coarse", "middle"]
    assert list(figures.style_groups(G, 8)) == ["coarse"]
    assert figures.default_row_groups(["coarse", "middle", "fine"], 6) == ["coarse"] * 3 + ["middle"] * 2 + ["fine"]
    assert figures.default_row_groups(["coarse", "middle"], 6) == ["coarse"] * 3 + ["middle"] * 3


def test_style_mixing_figure_size_and_coarse_rows_keep_b_coarse_styles():
    G = make_G(64, noise=0.3)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    canvas, groups = figures.style_mixing_figure(G, a, b, 64, psi=1.0, cutoff=None, cell=64)
    assert canvas.shape == (7 * 64, 4 * 64, 3) and canvas.dtype == np.uint8
    assert groups == ["coarse"] * 3 + ["middle"] * 2 + ["fine"]
    assert (canvas[:64, :64] == 255).all()  # blank corner

    # Cell (row 0 = coarse, column 1): A_1 with layers 0-3 from B_8, rendered with the figure's fixed noise.
    ws_a = G.map(generate.seed_latents(G, [1]))
    ws_b = G.map(generate.seed_latents(G, [8]))
    want_ws = ws_a.clone()
    want_ws[:, :4] = ws_b[:, :4]
    noise = generate.seed_noise(G, [0], 64)
    want = figures.compose([[generate.synthesize(G, want_ws, 64, 1.0, noise, torch.device("cpu"))[0]]], 64)
    got = canvas[64:128, 128:192]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # The coarse styles matter: the same cell without them (A_1 alone, left column) differs.
    assert np.abs(canvas[64:128, 0:64].astype(int) - got.astype(int)).mean() > 1


def test_style_mixing_needs_styles():
    G = make_G(32, arch=("generator.architecture=traditional", "model.latent_dim=32", "model.w_dim=32"))
    assert G.num_ws == 1
    with pytest.raises(generate.GenerateError, match="style-based"):
        figures.style_mixing_figure(G, [1], [2], 32)


def test_noise_figure_size_and_std_map():
    quiet = figures.noise_figure(make_G(16, noise=0.0), [1, 2], 16, samples=6, shown=3, cell=32)
    assert quiet.shape == (2 * 32, 4 * 32, 3)
    assert (quiet[:, 3 * 32:] == 0).all()  # no noise inputs in effect: zero standard deviation, black
    noisy = figures.noise_figure(make_G(16, noise=1.0), [1, 2], 16, samples=6, shown=3, cell=32)
    assert noisy[:, 3 * 32:].mean() > 5
    assert not np.array_equal(noisy[:32, :32], noisy[:32, 32:64])  # different noise, different image


def test_truncation_figure_psi_zero_is_the_average_for_every_seed():
    G = make_G(16)
    canvas = figures.truncation_figure(G, [1, 2, 3], [1.0, 0.0], 16, cell=16)
    assert canvas.shape == (3 * 16, 2 * 16, 3)
    col0 = [canvas[i * 16:(i + 1) * 16, 16:32] for i in range(3)]
    assert np.array_equal(col0[0], col0[1]) and np.array_equal(col0[1], col0[2])
    assert not np.array_equal(canvas[:16, :16], canvas[16:32, :16])


def test_parse_seeds():
    assert generate.parse_seeds("0-3,10, 12-13") == [0, 1, 2, 3, 10, 12, 13]
    for bad in ("", "a", "5-2", "1-x"):
        with pytest.raises(generate.GenerateError):
            generate.parse_seeds(bad)


# --------------------------------------------------------------------------------------------------
# Commands


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config(resolution=32)
    G = make_G(32, noise=0.2)
    # cur_nimg late enough that the schedule is at the final resolution
    return write_checkpoint(cfg, tmp_path_factory.mktemp("ck") / "ckpt-0000001000.pt", 10**8, G)


def test_generate_command_writes_a_grid_and_per_seed_images(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = generate.main(["--checkpoint", str(ckpt), "--seeds", "0-5", "--out", str(out), "--cols", "3",
                        "--outdir", str(tmp_path / "imgs"), "--device", "cpu"])
    assert rc == 0
    assert Image.open(out).size == (3 * 64, 2 * 64)  # 32 px images enlarged to 64 px cells
    assert Image.open(tmp_path / "imgs" / "seed0005.png").size == (32, 32)
    # The same seed gives the same image, whatever else is in the batch.
    generate.main(["--checkpoint", str(ckpt), "--seeds", "5", "--out", str(tmp_path / "one.png"), "--cell", "32",
                   "--truncation", "0.7", "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                          np.asarray(Image.open(tmp_path / "imgs" / "seed0005.png")))
    assert "Wrote" in capsys.readouterr().out


def test_generate_errors_are_one_line(ckpt, tmp_path, capsys):
    assert generate.main(["--checkpoint", str(ckpt), "--seeds", "x"]) == 2
    assert generate.main(["--checkpoint", str(tmp_path / "missing.pt"), "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_figures_command_all(ckpt, tmp_path):
    rc = figures.main(["all", "--checkpoint", str(ckpt), "--outdir", str(tmp_path), "--samples", "4",
                       "--cell", "32", "--device", "cpu"])
    assert rc == 0
    sizes = {p.name: Image.open(p).size for p in tmp_path.glob("*.png")}
    assert sizes == {"figure03-style-mixing.png": (6 * 32, 7 * 32), "figure04-noise-detail.png": (5 * 32, 2 * 32),
                     "figure08-truncation-trick.png": (6 * 32, 2 * 32)}
