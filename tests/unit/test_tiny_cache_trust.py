"""The built-in tiny models are loaded from DFUSE_CACHE only when no other user could have put
them there or could change them: a shared writable cache must not decide what a user's engine
generates (reliability issue, item 8).

Tests run as root here, so "another user" is a folder chown-ed to a uid nobody has."""
import grp
import json
import os
import pathlib
import pwd
import stat

import pytest
from click.testing import CliRunner

from dfuse.cli import main
from dfuse.engine.models import resolve_model_path
from dfuse.engine.models import tiny
from dfuse.engine.models.catalog import list_models

SOMEONE_ELSE = 54321  # a uid (and gid) with no account: nobody this test runs as
MODEL_DIR_NAME = f"tiny-sd3-v{tiny.BUILDER_VERSION}"


@pytest.fixture(autouse=True)
def _as_root_or_skip():
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")


def _cache_with_a_built_model(cache: pathlib.Path) -> pathlib.Path:
    """A cache as a finished build leaves it: a model folder that tiny_model_path returns as is."""
    model = cache / "models" / MODEL_DIR_NAME
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (model / "transformer" / "config.json").write_text("{}")
    for path in (cache, cache / "models", model, model / "transformer"):
        path.chmod(0o755)
    return model


def _fake_builder(out_dir):
    """Stands in for a real build: folders and files written under the caller's umask."""
    out_dir = pathlib.Path(out_dir)
    (out_dir / "vae").mkdir(parents=True, exist_ok=True)
    (out_dir / "model_index.json").write_text("{}")
    (out_dir / "vae" / "config.json").write_text("{}")


def test_a_model_folder_owned_by_another_user_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path / "cache"))
    model = _cache_with_a_built_model(tmp_path / "cache")
    os.chown(model, SOMEONE_ELSE, -1)
    with pytest.raises(PermissionError) as refused:
        resolve_model_path("tiny-sd3")
    message = str(refused.value)
    assert f"DFUSE_CACHE={tmp_path / 'cache'}" in message
    assert str(model) in message and f"uid {SOMEONE_ELSE}" in message
    assert "dfuse models build-tiny --name tiny-sd3 --rebuild" in message
    # `dfuse models list` says the folder is not used instead of pointing at it
    (sd3,) = [row for row in list_models() if row["model"] == "tiny-sd3"]
    assert "not used" in sd3["where"] and f"uid {SOMEONE_ELSE}" in sd3["where"]


def test_the_rebuild_the_error_suggests_replaces_another_users_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path / "cache"))
    model = _cache_with_a_built_model(tmp_path / "cache")
    os.chown(model, SOMEONE_ELSE, -1)
    monkeypatch.setitem(tiny.TINY_MODELS, "tiny-sd3", _fake_builder)
    assert tiny.tiny_model_path("tiny-sd3", rebuild=True) == model
    assert model.stat().st_uid == os.geteuid()
    assert tiny.tiny_model_path("tiny-sd3") == model


def test_a_cache_owned_by_another_user_is_refused_and_left_untouched(tmp_path, monkeypatch):
    cache = tmp_path / "shared-cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, SOMEONE_ELSE, SOMEONE_ELSE)
    monkeypatch.setenv("DFUSE_CACHE", str(cache))
    with pytest.raises(PermissionError, match=f"{cache} is owned by uid {SOMEONE_ELSE}") as refused:
        tiny.tiny_model_path("tiny-sd3")
    assert "set DFUSE_CACHE to a folder only you can write" in str(refused.value)
    assert list(cache.iterdir()) == []  # nothing made, nothing built in someone else's folder


def test_the_cli_prints_the_refusal_without_a_traceback(tmp_path, monkeypatch):
    cache = tmp_path / "shared-cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, SOMEONE_ELSE, SOMEONE_ELSE)
    monkeypatch.setenv("DFUSE_CACHE", str(cache))
    run = CliRunner().invoke(main, ["models", "build-tiny"])
    assert run.exit_code == 1
    assert f"Error: DFUSE_CACHE={cache}" in run.output and "Traceback" not in run.output


def test_a_cache_anyone_can_write_is_refused_unless_sticky(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model = _cache_with_a_built_model(cache)
    monkeypatch.setenv("DFUSE_CACHE", str(cache))
    cache.chmod(0o777)  # anyone could rename models/ away and put theirs in its place
    with pytest.raises(PermissionError, match="writable by every user") as refused:
        tiny.tiny_model_path("tiny-sd3")
    assert f"chmod go-w {cache}" in str(refused.value)
    # Sticky, as /tmp is: others can add entries but not replace ours, and ours are checked.
    cache.chmod(0o1777)
    assert tiny.tiny_model_path("tiny-sd3") == model


def test_a_shared_writable_folder_above_the_cache_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone can swap the folder below it
    model = _cache_with_a_built_model(shared / "mine")
    monkeypatch.setenv("DFUSE_CACHE", str(shared / "mine"))
    with pytest.raises(PermissionError, match=f"{shared} is writable by every user"):
        tiny.tiny_model_path("tiny-sd3")
    shared.chmod(0o1777)
    assert tiny.tiny_model_path("tiny-sd3") == model


def test_inside_a_model_folder_even_sticky_write_access_for_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path / "cache"))
    model = _cache_with_a_built_model(tmp_path / "cache")
    # Adding a file is enough to change a model (a dfuse.json sets its defaults): sticky or not.
    model.chmod(0o1777)
    with pytest.raises(PermissionError, match=f"{model} is writable by every user"):
        tiny.tiny_model_path("tiny-sd3")
    model.chmod(0o755)
    (model / "transformer" / "config.json").chmod(0o666)
    with pytest.raises(PermissionError, match="config.json is writable by every user"):
        tiny.tiny_model_path("tiny-sd3")


def test_a_cache_writable_by_a_group_of_unknown_members_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model = _cache_with_a_built_model(cache)
    monkeypatch.setenv("DFUSE_CACHE", str(cache))
    os.chown(cache / "models", -1, SOMEONE_ELSE)
    (cache / "models").chmod(0o775)
    with pytest.raises(PermissionError, match=f"writable by group {SOMEONE_ELSE}"):
        tiny.tiny_model_path("tiny-sd3")
    (cache / "models").chmod(0o755)
    assert tiny.tiny_model_path("tiny-sd3") == model


def test_group_write_is_fine_in_a_user_private_group_only(tmp_path, monkeypatch):
    """umask 002 systems give each user a group of their own and make everything group-writable:
    that must keep working, while a group with another member must not."""
    cache = tmp_path / "cache"
    model = _cache_with_a_built_model(cache)
    monkeypatch.setenv("DFUSE_CACHE", str(cache))
    os.chown(cache, -1, SOMEONE_ELSE)
    cache.chmod(0o775)
    me = pwd.getpwuid(os.geteuid())
    users = [pwd.struct_passwd((me.pw_name, "x", me.pw_uid, SOMEONE_ELSE, "", "/", "/bin/sh"))]
    group = grp.struct_group(("me", "x", SOMEONE_ELSE, []))
    monkeypatch.setattr(tiny.grp, "getgrgid", lambda gid: group if gid == SOMEONE_ELSE else grp.getgrgid(gid))
    monkeypatch.setattr(tiny.pwd, "getpwall", lambda: users)
    assert tiny.tiny_model_path("tiny-sd3") == model
    group = grp.struct_group(("me", "x", SOMEONE_ELSE, ["colleague"]))
    with pytest.raises(PermissionError, match="writable by group me, which other users may be in"):
        tiny.tiny_model_path("tiny-sd3")


def test_a_build_under_a_permissive_umask_leaves_a_folder_only_its_user_can_write(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tiny.TINY_MODELS, "tiny-sd3", _fake_builder)
    old_umask = os.umask(0)
    try:
        model = tiny.tiny_model_path("tiny-sd3")
    finally:
        os.umask(old_umask)
    built = [model, *model.rglob("*")]
    assert len(built) == 4
    for path in built + [model.parent, model.parent.parent]:
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    assert tiny.tiny_model_path("tiny-sd3") == model  # and it is used as it is
