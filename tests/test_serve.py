"""``multidiff serve`` without a browser: the request service (same checks and messages as
``multidiff generate``, the server's limits, files numbered on in one run folder), the command's
options and errors, and what the server refuses to hand out. The page itself: test_serve_browser.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from helpers import Served, multidiff_cli
from PIL import Image

from multidiff.cli.compose import ConfigError, compose
from multidiff.cli.main import main
from multidiff.cli.serve import ServeOptions
from multidiff.cli.service import GenerationService, Limits
from multidiff.webapp.page import media_kind


@pytest.fixture(scope="module")
def service(tiny_run, audio_run, tmp_path_factory):
    return GenerationService([str(tiny_run / "model"), str(audio_run / "model")], tmp_path_factory.mktemp("served"),
                             limits=Limits(steps=5, samples=3, scale=2.0, options={"duration": 1.5}))


def cli_error(capsys, *args: str) -> str:
    """The one-paragraph message ``multidiff generate ARGS`` prints (in this process)."""
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("multidiff generate: error: "), err
    return err.removeprefix("multidiff generate: error: ")


BAD = [  # (request, the same as generate's command-line arguments)
    ({"steps": 0}, ["steps=0"]),
    ({"guidance_scale": -1.0}, ["guidance_scale=-1.0"]),
    ({"seed": -3}, ["seed=-3"]),
    ({"strength": 1.5}, ["strength=1.5"]),
    ({"options": {"duration": 1.0}}, ["duration=1.0"]),  # the image model declares no duration
    ({"format": "wav"}, ["format=wav"]),
    ({"init": "/no/such/input.png"}, ["init=/no/such/input.png"]),
    ({"options": {"keep_box": [0, 0, 99, 99]}, "init": "INIT"}, ["keep_box=[0,0,99,99]", "init=INIT"]),
]


@pytest.mark.parametrize(("request_values", "args"), BAD, ids=[" ".join(a) for _, a in BAD])
def test_requests_are_refused_with_generates_own_message(service, tiny_run, capsys, tmp_path, request_values, args):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (40, 80, 120)).save(init)
    request_values = {k: (str(init) if v == "INIT" else v) for k, v in request_values.items()}
    args = [a.replace("INIT", str(init)) for a in args]
    model = str(tiny_run / "model")
    with pytest.raises(ConfigError) as e:
        service.check(model, {"prompt": "a handwritten digit one", "steps": 2, **request_values})
    assert str(e.value) == cli_error(capsys, f"model={model}", "prompt=a handwritten digit one", f"out={tmp_path / 'o'}",
                                     "steps=2", *args)


def test_the_servers_limits_name_the_setting(service, tiny_run, audio_run):
    image, audio = str(tiny_run / "model"), str(audio_run / "model")
    cases = [
        (image, {"steps": 6}, "steps=6 is more than this server allows (steps <= 5; max_steps"),
        (image, {"steps": 2, "num_samples": 4}, "num_samples=4 is more than this server allows (num_samples <= 3"),
        (audio, {"steps": 2, "options": {"duration": 1.6}}, "duration=1.6 is more than this server allows (duration <= 1.5"),
    ]
    for model, values, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            service.check(model, {"prompt": "x", **values})
    service.check(audio, {"prompt": "x", "steps": 2, "options": {"duration": 1.5}})  # at the cap: fine


def test_max_scale_bounds_the_sample_size_of_any_modality(tiny_run, audio_run, tmp_path):
    audio = str(audio_run / "model")
    service = GenerationService([audio], tmp_path, limits=Limits(scale=2.0))
    trained = service.adapters[audio].duration
    service.check(audio, {"prompt": "x", "options": {"duration": 1.9 * trained}})
    with pytest.raises(ConfigError, match=r"times this model's training size; this server allows up to 2 times \(max_scale"):
        service.check(audio, {"prompt": "x", "options": {"duration": 2.5 * trained}})


def test_unknown_model_and_sampler_list_the_choices(service, tiny_run):
    with pytest.raises(ConfigError, match="unknown model 'elsewhere'; this server serves: "):
        service.check("elsewhere", {"prompt": "x"})
    with pytest.raises(ConfigError, match="unknown sampler 'fastest'; valid choices: ddim, ddpm, dpmpp_2m"):
        service.check(str(tiny_run / "model"), {"prompt": "x", "steps": 2, "sampler": "fastest"})


def test_results_number_on_after_what_the_folder_holds_and_match_generate(tiny_run, tmp_path):
    """A folder that already holds a `generate` run: the server numbers on, appends rows, replaces nothing;
    and its files are what `generate` writes for the same settings and seed."""
    model, out = str(tiny_run / "model"), tmp_path / "out"
    assert main(["generate", f"model={model}", "prompt=a handwritten digit two", "num_samples=2", "seed=5", "steps=2",
                 f"out={out}"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    service = GenerationService([model], out)
    seen = []
    result = service.generate(model, {"prompt": "a handwritten digit two", "seed": 5, "steps": 2, "num_samples": 2},
                              progress=lambda done, total: seen.append((done, total)))
    assert [p.name for p in result.paths] == ["0002.png", "0003.png"]
    assert seen == [(k, 2) for k in range(3)]  # the page's progress bar follows every sampler step
    for old, new in (("0000.png", "0002.png"), ("0001.png", "0003.png")):
        assert (out / old).read_bytes() == before[old]  # nothing replaced
        assert (out / new).read_bytes() == before[old]  # same settings and seed: the same file
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert result.rows == rows[2:] and [r["seed"] for r in rows[2:]] == [5, 6]


def test_a_second_model_in_the_same_server_writes_its_own_kind_of_file(service, audio_run):
    import soundfile as sf

    result = service.generate(str(audio_run / "model"), {"prompt": "a bell ringing C5", "steps": 2,
                                                          "options": {"duration": 0.5}})
    (path,) = result.paths
    assert path.suffix == ".wav" and media_kind(path) == "audio"
    data, rate = sf.read(path)
    assert rate == service.adapters[str(audio_run / "model")].sample_rate and len(data) == rate // 2


def test_serve_yaml_and_the_options_schema_agree():
    cfg = compose("serve", [])
    assert sorted(cfg.keys()) == sorted([*ServeOptions.keys(), "sampler"])
    cfg.model = "m"
    opts = ServeOptions.from_config(cfg)
    assert opts.host == "127.0.0.1" and not opts.share  # this machine only, no share link, by default


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing model=...: the exported model directory"),
    (["model=/no/such/model"], "/no/such/model"),
    (["model=M", "port=70000"], "port=70000 is invalid: it must be a port number"),
    (["model=M", "steps=200"], "steps=200 is invalid: it must be a positive integer <= max_steps (100)"),
    (["model=M", "sampler=fastest"], "unknown sampler 'fastest'; valid choices"),
])
def test_serve_refuses_bad_options_in_one_paragraph(tiny_run, capsys, args, message):
    args = [a.replace("=M", f"={tiny_run / 'model'}") for a in args]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("multidiff serve: error: ") and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1


def test_serve_help_lists_its_options(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ServeOptions.keys():
        assert f"  {key} " in out


def test_a_busy_port_is_one_paragraph(tiny_run, tmp_path):
    first = Served(f"model={tiny_run / 'model'}", f"out={tmp_path / 'a'}")
    try:
        first.wait()
        proc = multidiff_cli("serve", f"model={tiny_run / 'model'}", f"out={tmp_path / 'b'}", f"port={first.port}",
                             check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot serve on 127.0.0.1:{first.port}" in proc.stderr and "Traceback" not in proc.stderr
        # nothing outside the run folder is served: not the model, not system files, no way around it
        (tmp_path / "secret.txt").write_text("not for the page")
        for path in (tiny_run / "model" / "multidiff.json", "/etc/passwd",
                     f"{tmp_path}/a/.gradio/../../secret.txt", f"{tmp_path}/secret.txt"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{first.url}gradio_api/file={path}")
            assert e.value.code in (403, 404)
    finally:
        out = first.stop()
    assert "Traceback" not in out
