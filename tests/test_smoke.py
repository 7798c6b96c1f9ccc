from conftest import SpecRepo


def test_apply_then_in_sync(repo: SpecRepo, cli) -> None:
    repo.spec("alpha")
    repo.commit()
    first = cli("apply")
    assert first.returncode == 0, first.stderr
    assert "create alpha" in first.stdout
    again = cli("plan")
    assert again.returncode == 0, again.stdout + again.stderr
