def test_code_fingerprint_follows_every_source_byte_and_name(tmp_path):
    """The resume keys' code fingerprint: equal for equal source, different after any edit or rename of a .py file,
    blind to compiled caches and to files that are not Python source."""
    from nemt.files import code_fingerprint
    pkg = tmp_path / "pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = code_fingerprint(pkg)
    assert len(first) == 16 and code_fingerprint(pkg) == first
    (pkg / "sub" / "__pycache__" / "b.cpython-312.pyc").write_bytes(b"\0compiled")
    (pkg / "notes.txt").write_text("not code")
    assert code_fingerprint(pkg) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    edited = code_fingerprint(pkg)
    assert edited != first
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "c.py")
    assert code_fingerprint(pkg) not in (first, edited)
    assert code_fingerprint() == code_fingerprint()  # the installed package's, read once per process
