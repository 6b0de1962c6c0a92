"""The Gradio demo (space/app.py): its plain functions, and the page itself in headless Chromium.

The browser test saves a screenshot to test-artifacts/gradio_app.png (and the error case to gradio_app_error.png)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, build_model_folder, shared

from ecg_files import peak_allocation, write_header, write_mat_zeros, write_record


ARTIFACTS = REPO / "test-artifacts"
EXPERTS = ["dlinear", "timesnet", "features"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("app") / "rr", EXPERTS, target_mean=800.0, target_std=150.0)


@pytest.fixture(scope="module")
def app():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("enecg_space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ functions
def test_analyse_a_wfdb_upload(app, model_folder):
    record = shared("ludb", "data", "1")
    out = app.analyse(str(model_folder), files=[str(record) + ".hea", str(record) + ".dat"], with_saliency=True,
                      upload_folder=record.parent)
    assert out["prediction"].startswith("### rr_interval: **") and " ms**" in out["prediction"]
    assert [row[0] for row in out["gate_rows"]] == EXPERTS
    assert sum(row[1] for row in out["gate_rows"]) == pytest.approx(1.0, abs=1e-3)
    assert [row[0] for row in out["expert_rows"]] == EXPERTS
    assert len(out["ecg_figure"].axes) >= 12 and out["result"]["source"].endswith("1.hea")


def test_analyse_a_simulated_example_shows_the_true_value(app, model_folder):
    out = app.analyse(str(model_folder), example="simulated #2", with_saliency=False)
    _, labels = app.example_record("simulated #2")
    assert f"(true value {labels['rr_interval']:.1f})" in out["prediction"]


@pytest.mark.parametrize(
    "files, message",
    [
        (["1.dat"], "needs its .hea header"),
        (["notes.txt"], "Not an ECG record file"),
        (["1.hea"], "not a readable ECG record"),  # header without its signal file
        ([], "Upload a record or pick a simulated example"),
    ],
)
def test_bad_uploads_give_messages(app, model_folder, tmp_path, files, message):
    record = shared("ludb", "data", "1")
    paths = []
    for name in files:
        target = tmp_path / name
        if name.startswith("1."):
            shutil.copy(str(record) + Path(name).suffix, target)
        else:
            target.write_text("hello")
        paths.append(str(target))
    with pytest.raises(ValueError, match=message):
        app.analyse(str(model_folder), files=paths, upload_folder=tmp_path)


def test_an_uploaded_mat_bomb_is_refused_from_its_header(app, model_folder, tmp_path):
    """A 120 kB Challenge .mat that inflates to 120 MB behind a valid header: a message, a few MB allocated."""
    write_mat_zeros(tmp_path / "bomb.mat", 12, 5_000_000)
    write_header(tmp_path / "bomb.hea", file_name="bomb.mat")
    app.load_pipeline(str(model_folder))  # loaded (and cached) before measuring
    peak, error = peak_allocation(app.analyse, str(model_folder), files=[str(tmp_path / "bomb.hea"),
                                                                       str(tmp_path / "bomb.mat")], upload_folder=tmp_path)
    assert isinstance(error, ValueError) and "too_long" in str(error) and "at most 60 s" in str(error), error
    assert peak < 20 * (1 << 20), f"{peak / (1 << 20):.0f} MB allocated to refuse it"


def test_only_files_inside_the_upload_folder_are_read(app, model_folder, tmp_path):
    """A request may name any path: files outside Gradio's upload folder are refused, also through a symlink or `..`
    inside it, with a message that does not say whether the file exists."""
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "server-data"
    for folder in (uploads, elsewhere):
        write_record(folder, "rec")
    (uploads / "link.hea").symlink_to(elsewhere / "rec.hea")
    outside = [[str(elsewhere / "rec.hea"), str(elsewhere / "rec.dat")], [str(uploads / "link.hea")],
               [str(uploads / ".." / "server-data" / "rec.hea"), str(uploads / "rec.dat")], ["/etc/passwd"]]
    for files in outside:
        with pytest.raises(ValueError, match="Only files uploaded to this page are read") as caught:
            app.analyse(str(model_folder), files=files, upload_folder=uploads)
        assert "server-data" not in str(caught.value) and "passwd" not in str(caught.value)
    out = app.analyse(str(model_folder), files=[str(uploads / "rec.hea"), str(uploads / "rec.dat")],
                      upload_folder=uploads, with_saliency=False)
    assert out["prediction"].startswith("### rr_interval: **")


def test_error_messages_name_the_file_not_the_servers_folders_or_its_contents(app, model_folder, tmp_path):
    """The page shows errors: they name the uploaded file and the problem, not where the server keeps it, nor what it
    holds (a CSV cell; the readers' own cases are in tests/data/test_data_preprocessing.py)."""
    upload = tmp_path / "record.csv"
    upload.write_text("1,2\n3,root:hunter2:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ValueError, match="record.csv is not a readable ECG record") as caught:
        app.analyse(str(model_folder), files=[str(upload)], sampling_rate=500, upload_folder=tmp_path)
    message = str(caught.value)
    assert "hunter2" not in message and "enecg-upload-" not in message and str(tmp_path) not in message, message


def test_each_run_of_the_app_keeps_its_uploads_in_a_folder_of_its_own(app, monkeypatch, tmp_path):
    """Gradio accepts a request's files from anywhere in its upload folder (GRADIO_TEMP_DIR, shared by every app and
    run on the machine); each run of this app gets a new folder inside it, so only its own uploads are readable."""
    monkeypatch.setattr(app, "build_demo", lambda model: type("Demo", (), {"launch": lambda self, **kwargs: None})())
    folders = []
    for _ in range(2):
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
        app.main(["--model", "some/model"])
        folders.append(Path(os.environ["GRADIO_TEMP_DIR"]))
    assert folders[0] != folders[1] and all(folder.parent == tmp_path and folder.is_dir() for folder in folders)


def test_a_model_that_does_not_load_gives_a_message(app, tmp_path):
    with pytest.raises(ValueError, match="Could not load the model"):
        app.analyse(str(tmp_path / "no-model-here"), example="simulated #0")


@pytest.mark.slow
def test_visitors_cannot_make_the_app_load_a_model(app, model_folder, tmp_path):
    """Loading a model runs its code: a folder with a modified pipeline_enecg.py must never be loaded because a
    visitor typed its path. Every event of the page is called with that path in every text input."""
    import gradio as gr

    evil = tmp_path / "evil"
    shutil.copytree(model_folder, evil)
    marker = tmp_path / "pwned"
    code = (evil / "pipeline_enecg.py").read_text()
    (evil / "pipeline_enecg.py").write_text(code.replace(
        "from __future__ import annotations\n", f"from __future__ import annotations\nopen({str(marker)!r}, 'w').close()\n", 1))
    demo = app.build_demo(str(model_folder))
    for function in demo.fns.values():
        values = [str(evil) if isinstance(c, gr.Textbox) else "simulated #0" if isinstance(c, gr.Dropdown) else None
                  for c in function.inputs]
        function.fn(*values)
    assert not marker.exists(), "the app ran code from a folder a visitor named"
    assert not any(isinstance(c, gr.Textbox) and "model" in str(c.label).lower() for c in demo.blocks.values())
    # The model the app was started with is served.
    prediction = demo.fns[0].fn(None, "simulated #0", None, "", False)[0]
    assert prediction.startswith("### rr_interval:"), prediction


def test_the_model_to_serve_is_a_command_line_option(app, monkeypatch):
    served = []
    monkeypatch.setattr(app, "build_demo", lambda model: served.append(model) or type("Demo", (), {
        "launch": lambda self, **kwargs: None})())
    app.main(["--model", "some/model"])
    assert served == ["some/model"]


# ------------------------------------------------------------------------------------------------ browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def gradio_temp_dir(tmp_path_factory) -> Path:
    """The GRADIO_TEMP_DIR of the app the tests start (rather than the machine's shared <tmp>/gradio)."""
    return tmp_path_factory.mktemp("gradio-temp")


@pytest.fixture(scope="module")
def server(model_folder, gradio_temp_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    env = {**os.environ, "ENECG_MODEL": str(model_folder), "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(gradio_temp_dir)}
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py")], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"the app did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
    yield url
    process.terminate()
    process.wait(timeout=30)


def _upload_and_predict(driver, url: str, files: list[str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 60)
    upload = wait.until(conditions.presence_of_element_located((By.CSS_SELECTOR, "#files input[type=file]")))
    upload.send_keys("\n".join(str(Path(name).resolve()) for name in files))  # chromedriver wants canonical paths
    for name in files:  # the upload finished when every file is listed (Gradio shows stem and suffix apart)
        wait.until(lambda d, p=Path(name): p.stem in d.find_element(By.ID, "files").text
                   and p.suffix in d.find_element(By.ID, "files").text)
    driver.find_element(By.CSS_SELECTOR, "#predict").click()


def test_browser_upload_shows_prediction_and_gate_weights(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    record = shared("ludb", "data", "1")
    _upload_and_predict(browser, server, [str(record) + ".hea", str(record) + ".dat"])
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "rr_interval" in d.find_element(By.ID, "prediction").text)
    wait.until(lambda d: all(name in d.find_element(By.ID, "gate-weights").text for name in EXPERTS))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ecg-plot img, #ecg-plot canvas, #ecg-plot svg"))
    prediction = browser.find_element(By.ID, "prediction").text
    gate_text = browser.find_element(By.ID, "gate-weights").text
    assert "ms" in prediction and "Error" not in prediction
    weights = [float(token) for token in gate_text.split() if token.replace(".", "", 1).isdigit()]
    assert len(weights) >= len(EXPERTS) and sum(weights[-len(EXPERTS):]) == pytest.approx(1.0, abs=2e-3)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "gradio_app.png"))
    assert (ARTIFACTS / "gradio_app.png").stat().st_size > 20_000


def test_browser_shows_errors_as_messages(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lonely = tmp_path / "1.dat"
    shutil.copy(str(shared("ludb", "data", "1")) + ".dat", lonely)
    _upload_and_predict(browser, server, [str(lonely)])
    WebDriverWait(browser, 120).until(lambda d: "needs its .hea header" in d.find_element(By.ID, "prediction").text)
    assert "Error" in browser.find_element(By.ID, "prediction").text
    browser.save_screenshot(str(ARTIFACTS / "gradio_app_error.png"))


# ------------------------------------------------------------------------------------------------ HTTP API
def _file_data(path: str | Path) -> dict:
    """A file input of Gradio's API (`gr.FileData`), naming `path` on the server."""
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def _upload(url: str, paths: list[Path]) -> list[dict]:
    """Upload files as the page does (`/gradio_api/upload`); their file inputs for the API."""
    import httpx

    uploaded = httpx.post(f"{url}gradio_api/upload", timeout=60,
                          files=[("files", (path.name, path.read_bytes())) for path in paths]).json()
    return [_file_data(path) for path in uploaded]


def _predict(url: str, files: list[dict], sampling_rate: float | None = None) -> tuple[str, str]:
    """Press Predict through the HTTP API (`/gradio_api/call/run`): ("error", "") when Gradio refuses the request,
    else (the page's status, its prediction text)."""
    import json

    import httpx

    payload = {"data": [files, "", sampling_rate, "", False]}
    event_id = httpx.post(f"{url}gradio_api/call/run", json=payload, timeout=60).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/run/{event_id}", timeout=300).text
    event, data = [line.split(": ", 1)[1] for line in stream.strip().splitlines()[-2:]]
    if event != "complete":
        return "error", ""
    outputs = json.loads(data)
    return outputs[5], outputs[0]


def test_requests_cannot_make_the_app_read_other_files_of_the_server(server, gradio_temp_dir, tmp_path):
    """Through the HTTP API, as any client can: a request naming a file of the server, a record that another app or an
    earlier run left in the shared Gradio folder, or a symlink there, gets no prediction and leaves no copy in Gradio's
    folder; the same record uploaded is predicted; an uploaded CSV's cell does not come back in the error."""
    secret = tmp_path / "server-data" / "accounts.csv"
    secret.parent.mkdir()
    secret.write_text("1,2\n3,root:hunter2:0:0:root:/root:/bin/bash\n")
    theirs = write_record(gradio_temp_dir / "another-app", "theirs")
    (gradio_temp_dir / "link.hea").symlink_to(secret.parent / "theirs.hea")
    shutil.copy(theirs.with_suffix(".hea"), secret.parent / "theirs.hea")
    shutil.copy(theirs.with_suffix(".dat"), secret.parent / "theirs.dat")
    crafted = {
        "server file": [_file_data(secret)],
        "server record": [_file_data(secret.parent / "theirs.hea"), _file_data(secret.parent / "theirs.dat")],
        "left in the Gradio folder": [_file_data(theirs.with_suffix(".hea")), _file_data(theirs.with_suffix(".dat"))],
        "symlink in the Gradio folder": [_file_data(gradio_temp_dir / "link.hea")],
    }
    for name, files in crafted.items():
        status, text = _predict(server, files, sampling_rate=500)
        assert status == "error" and "rr_interval" not in text and "hunter2" not in text, (name, text)
    planted = {theirs.with_suffix(".hea"), theirs.with_suffix(".dat"), gradio_temp_dir / "link.hea"}
    copies = [path for path in gradio_temp_dir.rglob("*") if path.is_file() and path not in planted
              and path.read_bytes() in (secret.read_bytes(), theirs.with_suffix(".dat").read_bytes())]
    assert not copies, f"copied into Gradio's folder: {copies}"

    mine = write_record(tmp_path / "mine", "mine")
    status, text = _predict(server, _upload(server, [mine.with_suffix(".hea"), mine.with_suffix(".dat")]))
    assert status == "ok" and text.startswith("### rr_interval: **"), text
    status, text = _predict(server, _upload(server, [secret]), sampling_rate=500)
    assert status == "error" and "accounts.csv is not a readable ECG record" in text and "hunter2" not in text, text
    assert str(gradio_temp_dir) not in text, text


# ------------------------------------------------------------------------------------------------ the Space folder
def _requirement_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


def test_space_requirements_are_the_package_requirements():
    """The Space installs what the package and the app need (setup.cfg's install_requires and the features,
    pretrained, moment and demo extras), and not momentfm, whose pins `make space` sidesteps."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    needed = _requirement_lines(setup["options"]["install_requires"])
    for extra in ("features", "pretrained", "moment", "demo"):
        needed |= _requirement_lines(setup["options.extras_require"][extra])
    listed = _requirement_lines((REPO / "space" / "requirements.txt").read_text())
    assert listed == needed, (listed - needed, needed - listed)
    assert not any(line.startswith("momentfm") for line in listed)


@pytest.mark.slow
def test_make_space_builds_a_folder_that_runs_on_its_own(tmp_path):
    """`make space` gives a folder with the app, its card and requirements, the enecg_hf package and momentfm; the app
    runs from it (both packages imported from the folder) on a model with a MOMENT expert."""
    from helpers import build_model_folder

    target = tmp_path / "space"
    result = subprocess.run(["make", "space", f"SPACE_DIR={target}", f"PYTHON={sys.executable}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"app.py", "README.md", "requirements.txt", "enecg_hf", "momentfm"} <= {p.name for p in target.iterdir()}
    assert (target / "README.md").read_text().startswith("---\ntitle: EnECG demo")
    model = build_model_folder(tmp_path / "model", ["moment", "dlinear"], target_mean=800.0, target_std=150.0)
    script = (
        "import sys, app, enecg_hf, momentfm\n"
        f"assert enecg_hf.__file__.startswith({str(target)!r}), enecg_hf.__file__\n"
        f"assert momentfm.__file__.startswith({str(target)!r}), momentfm.__file__\n"
        f"out = app.analyse({str(model)!r}, example='simulated #1', with_saliency=False)\n"
        "print('SPACE_OK', out['prediction'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=target, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "SPACE_OK ### rr_interval" in run.stdout, run.stdout + run.stderr


def test_declared_lower_bounds_are_the_tested_ones():
    """setup.cfg's lower bounds are the versions `make test-min` installs (.ci/min-versions.txt; torch's is the floor
    of transformers, see setup.cfg), and the endpoint's requirements.txt declares the same bounds."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.version import Version

    from enecg_hf.training.serving_export import ENDPOINT_REQUIREMENTS

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = {Requirement(line).name: Requirement(line).specifier for line in
                _requirement_lines(setup["options"]["install_requires"])}
    pinned = {Requirement(line).name: Requirement(line).specifier for line in
              _requirement_lines((REPO / ".ci" / "min-versions.txt").read_text()) if not line.startswith("--")}
    assert set(pinned) - {"pyarrow"} == set(declared) - {"torch"}
    pinned.pop("pyarrow")  # a dependency of datasets, pinned so that the oldest numpy can be tested
    for name, pin in pinned.items():
        (tested,) = [Version(spec.version) for spec in pin if spec.operator == "=="]
        assert [Version(spec.version) for spec in declared[name] if spec.operator == ">="] == [tested], name
    endpoint = {Requirement(line).name: Requirement(line).specifier for line in _requirement_lines(ENDPOINT_REQUIREMENTS)}
    for name, specifier in endpoint.items():
        if name in declared:
            assert specifier == declared[name], (name, specifier, declared[name])
