"""Job recipes: every shipped one validates, runs as the same job as its flags, records
itself and its overrides, and bad recipes are refused with one line."""

import json

import pytest
from safetensors.torch import load_file

from quant import recipes
from quant.cli import main, quantize_main


def cli(capsys, fn, *args):
    capsys.readouterr()
    code = fn(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def recipe_flags(recipe: recipes.JobRecipe) -> list[str]:
    """The quantize flags that say what the recipe says, written out by hand."""
    flags = ["--method", recipe.method]
    for key, value in recipe.options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    names = {"dataset": "--calib", "nsamples": "--nsamples", "seqlen": "--seqlen",
             "seed": "--seed"}
    for key, value in recipe.calibration.items():
        flags += [names[key], str(value)]
    return flags + ["--eval-ppl", recipe.eval.get("ppl", "all-demo")]


def test_every_shipped_recipe_loads_validates_and_is_listed(capsys):
    shipped = recipes.job_recipes()
    assert {"demo-rtn4", "demo-gptq4", "demo-gptq3", "demo-aqlm2", "llama-3-8b-aqlm2",
            "llama-2-7b-gptq4", "qwen2.5-7b-gptq4", "mistral-7b-aqlm2"} <= set(shipped)
    for name, recipe in shipped.items():
        assert recipe.description and recipe.name == name
        assert recipe.settings()["method"] == recipe.method
    code, out, _ = cli(capsys, main, "recipes")
    assert code == 0 and all(f"{name} " in out for name in shipped)
    code, out, _ = cli(capsys, main, "recipes", "--json")
    assert [r["name"] for r in json.loads(out)] == list(shipped)


def test_the_gptq_table_rows_are_recipes():
    from tests.test_scripts import load_script

    for row, recipe in load_script("gptq_demo_table").ROWS.items():
        assert recipe in recipes.job_recipes(), row


def test_a_recipe_gives_the_same_checkpoint_as_its_flags(tiny_dir, tmp_path, capsys):
    recipe = recipes.find_recipe("demo-gptq4")
    # the tiny model's MLP is 96 wide: group 32 instead of the recipe's 64
    common = [str(tiny_dir), "--group-size", "32", "--nsamples", "4", "--seqlen", "64",
              "--no-eval"]
    code, _, err = cli(capsys, quantize_main, "--recipe", "demo-gptq4", *common,
                       "--out", str(tmp_path / "recipe"))
    assert code == 0, err
    flags = recipe_flags(recipe)
    code, _, err = cli(capsys, quantize_main, *flags, *common, "--out", str(tmp_path / "flags"))
    assert code == 0, err
    a = load_file(str(tmp_path / "recipe" / "model.safetensors"))
    b = load_file(str(tmp_path / "flags" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    report = json.loads((tmp_path / "recipe" / "quant_report.json").read_text())
    assert report["recipe"]["name"] == "demo-gptq4"
    assert report["recipe"]["overrides"] == {"model": str(tiny_dir), "nsamples": 4,
                                             "seqlen": 64, "group_size": 32}
    assert report["options"]["bits"] == 4 and report["options"]["act_order"] is True
    assert report["calibration"]["dataset"] == "mix-demo"
    assert "recipe" not in json.loads((tmp_path / "flags" / "quant_report.json").read_text())


def test_an_override_wins_and_another_method_drops_the_recipe_options(tiny_dir, tmp_path,
                                                                      capsys):
    code, _, err = cli(capsys, quantize_main, "--recipe", "demo-gptq4", str(tiny_dir),
                       "--method", "rtn", "--bits", "3", "--group-size", "32", "--no-eval",
                       "--out", str(tmp_path / "q"))
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["method"] == "rtn" and report["options"]["bits"] == 3
    assert report["recipe"]["overrides"] == {"model": str(tiny_dir), "method": "rtn",
                                             "bits": 3, "group_size": 32}


@pytest.mark.parametrize("text,pattern", [
    ('description = "x"\nmethod = "gptq"\ncolour = "red"\n', "unknown key 'colour'"),
    ('description = "x"\nmethod = "gptq"\n[options]\nbitz = 4\n', "unknown key 'bitz' in [options]"),
    ('description = "x"\nmethod = "gptq"\n[calibration]\nsamples = 4\n',
     "unknown key 'samples' in [calibration]"),
    ('description = "x"\nmethod = "gptq"\n[options]\nbits = 7\n', "--bits 7 is not supported"),
    ('description = "x"\nmethod = "nope"\n', "unknown method 'nope'"),
    ('method = "gptq"\n', "missing key 'description'"),
    ('description = "x"\nmethod = "gptq"\n[eval]\nppl = "news-demo"\n', "unknown data set"),
    ('description = "x\n', "not a readable TOML file"),
])
def test_bad_recipes_are_refused_naming_the_file(tmp_path, capsys, text, pattern):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    code, _, err = cli(capsys, quantize_main, "--recipe", str(path), "--no-eval",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert pattern in err and str(path) in err, err
    assert not (tmp_path / "out").exists()


def test_an_unknown_recipe_lists_the_known_ones(capsys):
    code, _, err = cli(capsys, quantize_main, "--recipe", "demo-gptq5")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "did you mean demo-gptq4" in err and "demo-aqlm2" in err
