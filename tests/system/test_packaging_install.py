"""The .deb and .rpm from `dev/package`: lint, payload, and the .deb's life on a clean Debian.

The packages are built once per session (`dev/package --worktree`, release 1 and release 2,
the second an upgrade of the first). The install tests boot a clean Debian 12 — debootstrap's
minbase with systemd and dbus, no meshlet user, no podman, no Python (`dev/package testhost`)
— install the .deb with apt-get (its dependencies come from the Debian mirror), point it at
the local atproto network, and walk it through enable, upgrade, remove and purge. The tests
of that walk run in file order and share the host.

Evidence (lintian, rpm -qp, rpmlint, each step's output) goes to $LOGDIR/packaging-*.log.
An .rpm cannot be installed here (no RPM distribution): its payload, flags and scripts are
checked instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dev" / "package"
CACHE = Path(os.environ.get("MESHLET_CACHE", "/var/cache/meshlet-dev"))
LOGDIR = Path(os.environ.get("MESHLET_LOGDIR", CACHE / "logs"))
HOST = f"pkg{os.getpid()}"
# Subordinate ids the package gives user meshlet: 64 user namespaces of 65536 (postinstall).
SUBIDS = 64 * 65536

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
    reason="builds in and boots Debian rootfs with systemd-nspawn: needs root",
)


def log(name: str, text: str) -> Path:
    """Append `text` to $LOGDIR/packaging-NAME.log (the test log a reviewer reads)."""
    LOGDIR.mkdir(parents=True, exist_ok=True)
    path = LOGDIR / f"packaging-{name}.log"
    with path.open("a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def sh(*cmd: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path
    deb_upgrade: Path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """Both packages of the work tree, and a release-2 .deb to upgrade to (built once).

    MESHLET_TEST_PACKAGES=DIR reuses packages built before into DIR (`dev/package
    --worktree --out DIR` and the same with `--release 2`), to iterate on these tests.
    """
    reuse = os.environ.get("MESHLET_TEST_PACKAGES")
    if reuse:
        d = Path(reuse)
        return Packages(
            deb=next(d.glob("meshlet_*-1_amd64.deb")),
            rpm=next(d.glob("meshlet-*-1.x86_64.rpm")),
            deb_upgrade=next(d.glob("meshlet_*-2_amd64.deb")),
        )
    out = tmp_path_factory.mktemp("dist")
    built: dict[int, list[Path]] = {}
    for release in (1, 2):
        proc = sh(PACKAGE, "--worktree", "--release", str(release), "--out", out, timeout=1800)
        if proc.returncode != 0:
            pytest.fail(f"dev/package failed:\n{proc.stderr[-3000:]}", pytrace=False)
        built[release] = [Path(p) for p in proc.stdout.split()]
    deb, rpm = built[1]
    return Packages(deb=deb, rpm=rpm, deb_upgrade=built[2][0])


# --- lint and payload (no host needed) ---------------------------------------------------


def test_lintian_finds_no_errors_in_the_deb(packages: Packages) -> None:
    proc = sh("lintian", "--tag-display-limit", "0", packages.deb)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    path = log(
        "lintian",
        f"$ lintian {packages.deb.name}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})",
    )
    errors = [t for t in tags if t.startswith("E: ")]
    assert not errors, f"lintian errors (see {path}):\n" + "\n".join(errors)
    # Every program has its man page (packaging/man), and lintian can read them.
    assert "no-manual-page" not in proc.stdout and "manpage-has" not in proc.stdout, proc.stdout
    listing = sh("dpkg-deb", "-c", packages.deb).stdout
    for doc in (
        "./usr/share/man/man8/meshletd.8.gz",
        "./usr/share/man/man1/meshletctl.1.gz",
        "./usr/share/man/man5/meshlet.toml.5.gz",
        "./usr/share/doc/meshlet/cli.md",
        "./usr/share/doc/meshlet/packaging.md",
    ):
        assert doc in listing, doc


def test_rpm_declares_its_interpreter_config_file_and_scripts(packages: Packages) -> None:
    requires = sh("rpm", "-qp", "--requires", packages.rpm)
    scripts = sh("rpm", "-qp", "--scripts", packages.rpm)
    flags = sh(
        "rpm",
        "-qp",
        "--qf",
        "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]",
        packages.rpm,
    )
    lint = sh("rpmlint", packages.rpm)
    log(
        "rpm",
        f"$ rpm -qp --requires {packages.rpm.name}\n{requires.stdout}"
        f"$ rpm -qp --scripts {packages.rpm.name}\n{scripts.stdout}"
        f"$ rpm -qp --qf FILEFLAGS/MODES/NAMES (outside /usr/lib/meshlet)\n"
        + "".join(f"{x}\n" for x in flags.stdout.splitlines() if "/usr/lib/meshlet/" not in x)
        + f"$ rpmlint {packages.rpm.name}\n{lint.stdout}{lint.stderr}(exit {lint.returncode})",
    )
    assert requires.returncode == 0 and scripts.returncode == 0
    needs = set(requires.stdout.split())
    assert {"python3.11", "podman", "systemd", "shadow-utils"} <= needs
    for scriptlet in (
        "postinstall scriptlet",
        "preuninstall scriptlet",
        "postuninstall scriptlet",
        "posttrans scriptlet",
    ):
        assert scriptlet in scripts.stdout
    assert "systemd-sysusers meshlet.conf" in scripts.stdout
    assert 'usermod "--add-sub${kind}s"' in scripts.stdout
    assert "try-restart meshletd.service" in scripts.stdout
    code = [x for x in scripts.stdout.splitlines() if not x.lstrip().startswith("#")]
    # (meshlet's own user manager may start its pause holder; meshletd is never started.)
    starts = [x for x in code if re.search(r"systemctl (.* )?(enable|start) .*meshletd", x)]
    assert not starts, starts
    by_name = {line.split()[-1]: line.split()[:-1] for line in flags.stdout.splitlines()}
    assert by_name["/etc/meshlet/meshlet.toml"][0] == "cn"  # %config(noreplace)
    assert by_name["/etc/meshlet/credentials"][-1] == "drwx------"
    for path in (
        "/usr/bin/meshletd",
        "/usr/bin/meshletctl",
        "/usr/lib/systemd/system/meshletd.service",
        "/usr/lib/systemd/system/meshlet.slice",
        "/usr/lib/sysusers.d/meshlet.conf",
        "/usr/lib/tmpfiles.d/meshlet.conf",
        "/usr/lib/systemd/user/meshlet-podman-pause.service",
        "/usr/lib/systemd/user/default.target.wants/meshlet-podman-pause.service",
    ):
        assert path in by_name, path
    for page in (
        "/usr/share/man/man8/meshletd.8.gz",
        "/usr/share/man/man1/meshletctl.1.gz",
        "/usr/share/man/man5/meshlet.toml.5.gz",
    ):
        assert "d" in by_name[page][0], page  # %doc
    # rpmlint: only what the package means to do (root-only credentials) or cannot do here
    # (sign: no key on a dev machine).
    accepted = {"no-signature", "non-standard-dir-perm"}
    errors = [x for x in lint.stdout.splitlines() if " E: " in x]
    assert all(x.split(" E: ")[1].split()[0] in accepted for x in errors), errors


def test_rpm_launchers_run_python311_isolated(packages: Packages, tmp_path: Path) -> None:
    payload = subprocess.run(["rpm2cpio", str(packages.rpm)], capture_output=True, check=True)
    subprocess.run(
        ["cpio", "-idm", "--quiet", "./usr/bin/meshletd", "./usr/bin/meshletctl"],
        input=payload.stdout,
        cwd=tmp_path,
        check=True,
    )
    for name in ("meshletd", "meshletctl"):
        first = (tmp_path / "usr" / "bin" / name).read_text().splitlines()[0]
        assert first == "#!/usr/bin/python3.11 -IS"


# --- a clean Debian 12 -----------------------------------------------------------------


@dataclass
class CleanHost:
    """A booted clean bookworm (`dev/package testhost`); commands run as root units in it."""

    name: str

    def run(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = sh(PACKAGE, "testhost", "exec", self.name, "--", "sh", "-c", script, timeout=timeout)
        log(
            "install",
            f"[{self.name}]$ {script}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n",
        )
        return proc

    def put(self, path: Path) -> str:
        """Copy a file into the host's /root/pkgs (the project folder is the only one shared)."""
        root = Path(os.environ.get("MESHLET_PKGTEST_RUN", "/run/meshlet-pkgtest")) / self.name
        dest = root / "root" / "root" / "pkgs"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
        return f"/root/pkgs/{path.name}"

    def ok(self, script: str, timeout: float = 600) -> str:
        proc = self.run(script, timeout)
        assert proc.returncode == 0, (
            f"{script!r} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
        return proc.stdout

    def active(self, unit: str) -> str:
        return self.run(f"systemctl is-active {unit}").stdout.strip()


@pytest.fixture(scope="module")
def host(packages: Packages) -> Iterator[CleanHost]:
    built = sh(PACKAGE, "testhost", "build", timeout=1800)
    if built.returncode != 0:
        pytest.fail(f"dev/package testhost build failed:\n{built.stderr[-3000:]}", pytrace=False)
    up = sh(PACKAGE, "testhost", "up", HOST, timeout=120)
    if up.returncode != 0:
        pytest.fail(f"dev/package testhost up failed:\n{up.stderr[-3000:]}", pytrace=False)
    log("install", f"=== {time.strftime('%F %T')} clean host {HOST} booted\n")
    try:
        yield CleanHost(HOST)
    finally:
        sh(PACKAGE, "testhost", "down", HOST, timeout=120)


# Paths the walk checks: what the package or meshletd make outside the package's own files.
MADE = (
    "/etc/meshlet",
    "/var/lib/meshlet",
    "/var/lib/meshlet-podman",
    "/run/meshlet",
    "/run/meshlet-replicas",
    "/var/lib/systemd/linger/meshlet",
)
# Outside these, the host's files before the install and after purge + autoremove must match.
SNAPSHOT = (
    "find /etc /usr /var /opt /srv /root -xdev"
    " \\( -path /var/cache -o -path /var/log -o -path /var/lib/apt -o -path /var/lib/dpkg"
    " -o -path /var/lib/systemd/deb-systemd-helper-enabled -o -path /var/lib/systemd/catalog"
    " -o -path /var/lib/ucf -o -path /root/pkgs -o -path /usr/lib/python3"
    " -o -name __pycache__ \\) -prune"
    " -o -print | sort"
)


# Process lists from /proc (minbase has no procps): meshletd's, and those of user meshlet.
MESHLETD_PROCS = "grep -l '/usr/bin/meshlet[d]' /proc/[0-9]*/cmdline 2>/dev/null || true"
MESHLET_PROCS = (
    "u=$(id -u meshlet); awk -v u=$u '/^Uid:/ && $2 == u { print FILENAME }'"
    " /proc/[0-9]*/status 2>/dev/null || true"
)


class State:
    """What one step of the walk leaves for the next."""

    before: list[str]
    files: list[str]
    mesh_did: str
    pds: str
    replica: tuple[str, str, str]


state = State()


def test_install_on_a_clean_debian_adds_user_and_units_but_starts_nothing(
    host: CleanHost, packages: Packages
) -> None:
    assert host.run("id meshlet").returncode != 0, "the clean host already has a meshlet user"
    assert host.run("command -v python3 podman").returncode != 0, "the host is not clean"
    state.before = host.ok(SNAPSHOT).splitlines()
    out = host.ok(f"apt-get install -y -q {host.put(packages.deb)} 2>&1", timeout=900)
    assert "Setting up meshlet (" in out
    state.files = host.ok("dpkg -L meshlet").splitlines()
    # The user for rootless podman: system uid, subordinate ids, home, lingering.
    uid = int(host.ok("id -u meshlet"))
    assert uid < 1000
    assert host.ok("getent group meshlet-admin")
    assert re.search(rf"^meshlet:\d+:{SUBIDS}$", host.ok("cat /etc/subuid"), re.M)
    assert re.search(rf"^meshlet:\d+:{SUBIDS}$", host.ok("cat /etc/subgid"), re.M)
    assert host.ok("stat -c '%U %a' /var/lib/meshlet-podman /etc/meshlet/credentials").split() == [
        "meshlet",
        "700",
        "root",
        "700",
    ]
    assert host.ok("loginctl show-user meshlet -p Linger").strip() == "Linger=yes"
    # Its user manager holds rootless podman's namespace, outside meshletd's sandbox.
    deadline = time.monotonic() + 30
    pause = "systemctl --user -M meshlet@ is-active meshlet-podman-pause.service"
    while host.run(pause).stdout.strip() != "active":
        assert time.monotonic() < deadline, "meshlet-podman-pause.service did not start"
        time.sleep(0.5)
    # Not enabled and not started: the admin configures first.
    assert host.run("systemctl is-enabled meshletd").stdout.strip() == "disabled"
    assert host.active("meshletd") == "inactive"
    assert host.ok("systemctl show meshlet.slice -p LoadState").strip() == "LoadState=loaded"
    # The shipped config is a commented example that tells what is missing.
    check = host.run("meshletd --check")
    assert check.returncode != 0 and "did: required key is missing" in check.stderr
    # Launchers: the bundle, isolated from the user's and the system's site-packages.
    site = "/root/.local/lib/python3.11/site-packages"
    host.ok(f"mkdir -p {site} && echo 'raise SystemExit(\"user site used\")' > {site}/typer.py")
    assert "meshletctl" in host.ok("PYTHONPATH=/nonexistent meshletctl --help")
    host.ok("rm -rf /root/.local")


def test_enable_now_starts_meshletd_against_the_local_network_and_status_answers(
    host: CleanHost, devnet
) -> None:
    k = os.getpid() % 100000
    owner = devnet.create_account(f"pkgown{k}", pds=0)
    mesh = devnet.create_account(f"pkgmsh{k}", pds=0)
    state.mesh_did, state.pds = mesh.did, mesh.pds_url
    # A commune of one (its owner consents to itself), so that it can run a replica that
    # the upgrade must leave alone.
    config = (
        f'did = "{mesh.did}"\nowner = "{owner.did}"\npds = "{mesh.pds_url}"\n'
        f'plc_url = "{devnet.plc_url}"\n\n[listen]\nxrpc = "127.0.0.1:{2600 + k % 1000}"\n'
        '\n[[clusters]]\nname = "home"\nmembers = []\n'
    )
    host.ok(f"cat > /etc/meshlet/meshlet.toml <<'EOF'\n{config}EOF")
    host.ok(
        f"printf %s '{mesh.app_password}' > /etc/meshlet/credentials/meshlet-app-password"
        f" && printf %s '{owner.app_password}' > /etc/meshlet/credentials/owner-app-password"
        " && chmod 600 /etc/meshlet/credentials/*"
    )
    host.ok("meshletd --check")
    enabled = host.run("systemctl enable --now meshletd", timeout=120)
    host.run("journalctl -u meshletd --no-pager | tail -n 40")  # into the log, either way
    assert enabled.returncode == 0, enabled.stderr
    assert host.active("meshletd") == "active"
    status = host.ok("meshletctl status")
    assert mesh.did in status and owner.did in status
    # It reached the network: the meshlet's own record is on its PDS.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = httpx.get(
            f"{mesh.pds_url}/xrpc/com.atproto.repo.listRecords",
            params={"repo": mesh.did, "collection": "commune.scheduler.meshletOwner"},
        )
        if r.status_code == 200 and r.json().get("records"):
            break
        time.sleep(0.5)
    log("install", f"meshletOwner records of {mesh.did}: {r.status_code} {r.text[:600]}")
    assert r.json().get("records"), "meshletd published no meshletOwner record"


# The image without a registry: busybox-static from Debian, imported as user meshlet.
IMPORT_IMAGE = (
    "apt-get -o DPkg::Lock::Timeout=600 install -y -q busybox-static >/dev/null"
    " && d=$(mktemp -d /tmp/bb.XXXXXX)"
    " && mkdir -p $d/bin && cp /bin/busybox $d/bin/"
    " && for a in $(/bin/busybox --list); do [ $a = busybox ] || ln -s busybox $d/bin/$a; done"
    " && tar -C $d -cf /tmp/bb.tar . && chmod 644 /tmp/bb.tar && cd /tmp"
    " && runuser -u meshlet -- env XDG_RUNTIME_DIR=/run/user/$(id -u meshlet)"
    " podman import --change 'CMD [\"/bin/sh\"]' /tmp/bb.tar localhost/busybox:latest"
)


def replica_container(host: CleanHost) -> tuple[str, str, str] | None:
    """(unit, container id, start time) of the one replica running on the host, or None."""
    units = host.run(
        "systemctl list-units --plain --no-legend --state=active 'meshlet-*' | awk '{print $1}'"
    ).stdout.split()
    units = [u for u in units if u != "meshlet-podman-pause.service"]
    if len(units) != 1:
        return None
    got = host.run(
        # (from /: user meshlet may not enter root's working directory)
        f"cd / && runuser -u meshlet -- env XDG_RUNTIME_DIR=/run/user/$(id -u meshlet)"
        " podman inspect"
        f" --format '{{{{.Id}}}} {{{{.State.StartedAt}}}}' {units[0].removesuffix('.service')}"
    )
    if got.returncode != 0:
        return None
    cid, started = got.stdout.strip().split(" ", 1)
    return units[0], cid, started


def test_a_replica_runs_on_the_installed_meshlet(host: CleanHost) -> None:
    host.ok(IMPORT_IMAGE, timeout=600)
    # --network none: this clean host shares the machine's network namespace, where
    # systemd-nspawn withholds CAP_NET_ADMIN, so meshletd cannot load its nftables rules and
    # (failing closed) starts no replica with a network; one without needs none. The rules
    # themselves are tested on hosts with networks of their own (test_tenancy.py).
    out = host.ok(
        "meshletctl run --json --name keep --network none --cpu 100m --memory 32Mi"
        " localhost/busybox:latest -- sleep 100000"
    )
    assert "at://" in out, out
    deadline = time.monotonic() + 120
    while (got := replica_container(host)) is None:
        assert time.monotonic() < deadline, (
            host.run("journalctl -u meshletd -n 60 --no-pager").stdout
            + "\n--- the replicas' units ---\n"
            + host.run("journalctl -u 'meshlet-*' -n 80 --no-pager").stdout
        )
        time.sleep(1)
    state.replica = got


def test_upgrade_keeps_the_config_and_restarts_the_service(
    host: CleanHost, packages: Packages
) -> None:
    config = host.ok("cat /etc/meshlet/meshlet.toml")
    pid = host.ok("systemctl show meshletd -p MainPID --value").strip()
    out = host.ok(f"apt-get install -y -q {host.put(packages.deb_upgrade)} 2>&1", timeout=900)
    assert re.search(r"Unpacking meshlet \(0\.1\.0-2\) over \(0\.1\.0-1\)", out), out
    assert host.ok("dpkg -s meshlet | sed -n 's/^Version: //p'").strip() == "0.1.0-2"
    assert host.ok("cat /etc/meshlet/meshlet.toml") == config
    assert host.active("meshletd") == "active"
    assert host.ok("systemctl show meshletd -p MainPID --value").strip() not in {pid, "0"}
    assert host.run("systemctl is-enabled meshletd").stdout.strip() == "enabled"
    assert state.mesh_did in host.ok("meshletctl status")


def test_upgrade_leaves_the_running_replica_alone(host: CleanHost) -> None:
    """The upgrade restarted meshletd; the replica is the very same container (id and start
    time) and stays so while the new meshletd settles (issue 13)."""
    before = getattr(state, "replica", None) or pytest.fail("no replica ran before", False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = replica_container(host)
        assert now == before, (
            f"replica before the upgrade {before}, now {now}\n"
            + host.run("journalctl -u meshletd -n 60 --no-pager").stdout
        )
        time.sleep(2)
    said = host.run("journalctl -u meshletd -n 300 --no-pager -o cat").stdout
    since = said.rsplit("starting: meshlet", 1)[-1]
    assert "stopping replica" not in since and "starting replica" not in since, since


def test_remove_stops_meshletd_and_keeps_configuration(host: CleanHost) -> None:
    host.ok("apt-get remove -y -q meshlet 2>&1")
    assert host.active("meshletd") in {"inactive", "unknown"}
    assert host.ok(MESHLETD_PROCS).split() == []
    assert host.run("test -x /usr/bin/meshletd").returncode != 0
    assert "rc  meshlet" in host.ok("dpkg -l meshlet")
    assert host.ok("test -f /etc/meshlet/meshlet.toml && ls /etc/meshlet/credentials").split() == [
        "meshlet-app-password",
        "owner-app-password",
    ]
    # The bytecode the postinst made is gone with the package's files.
    assert host.run("test -e /usr/lib/meshlet").returncode != 0


def test_purge_leaves_nothing_behind(host: CleanHost) -> None:
    host.ok("apt-get purge -y -q meshlet 2>&1")
    assert host.run("dpkg -s meshlet").returncode != 0
    # Every path the package had or made is gone, unless another package owns it (/usr/bin…).
    # (/usr/lib/meshlet stands for the files under it: one shell argument is at most 128 KiB.)
    files = [f for f in state.files if not f.startswith("/usr/lib/meshlet/") and f not in {"/."}]
    paths = " ".join(f"'{p}'" for p in (*MADE, *files))
    left = host.ok(
        f'for p in {paths}; do if [ -e "$p" ] || [ -L "$p" ]; then'
        ' dpkg-query -S "$p" >/dev/null 2>&1 || echo "$p"; fi; done'
    )
    assert left.split() == []
    assert host.ok("ls /etc/systemd/system/*.wants/ | grep -c meshlet || true").strip() == "0"
    assert "meshletd.service" not in host.ok("systemctl list-unit-files --all --no-legend")
    assert host.ok(MESHLET_PROCS).split() == [], "processes of user meshlet are left"
    # Debian's convention: the system user and group stay (files may still carry the ids).
    assert host.run("id meshlet").returncode == 0
    # With the dependencies autoremoved, the host's files are as before the install, apart
    # from the user databases (the kept user) and what dpkg/apt keep about themselves.
    host.ok("apt-get autoremove --purge -y -q 2>&1", timeout=600)
    after = host.ok(SNAPSHOT).splitlines()
    user_db = {
        "/etc/passwd-",
        "/etc/group-",
        "/etc/shadow-",
        "/etc/gshadow-",
        "/etc/subuid-",
        "/etc/subgid-",
        "/etc/subuid",
        "/etc/subgid",
        "/etc/.pwd.lock",
    }
    added = sorted(set(after) - set(state.before) - user_db)
    removed = sorted(set(state.before) - set(after))
    log(
        "install",
        "files added since before the install:\n"
        + "\n".join(added)
        + "\nfiles removed:\n"
        + "\n".join(removed),
    )
    assert [p for p in added if "meshlet" in p] == []


# --- the .rpm's scriptlets, run with rpm's arguments on a clean host ---------------------


def test_rpm_scriptlets_with_rpm_arguments_set_up_and_tear_down(
    packages: Packages, tmp_path: Path
) -> None:
    """No RPM distribution here: unpack the .rpm's payload into a clean Debian host and run its
    scriptlets as rpm would (install 1, upgrade 2/1, erase 0). It checks the arguments are read
    in rpm's convention; rpm itself, python3.11 and an EL userland are not exercised."""
    scripts = {}
    for tag in ("POSTIN", "PREUN", "POSTUN", "POSTTRANS"):
        out = sh("rpm", "-qp", "--qf", f"%{{{tag}}}", packages.rpm).stdout
        assert out.startswith("#!/bin/sh"), tag
        scripts[tag] = out
    payload = subprocess.run(["rpm2cpio", str(packages.rpm)], capture_output=True, check=True)
    tree = tmp_path / "payload"
    tree.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=payload.stdout, cwd=tree, check=True)
    name = f"pkgrpm{os.getpid()}"
    up = sh(PACKAGE, "testhost", "up", name, timeout=120)
    assert up.returncode == 0, up.stderr
    host = CleanHost(name)
    try:
        root = Path(os.environ.get("MESHLET_PKGTEST_RUN", "/run/meshlet-pkgtest")) / name / "root"
        # Only what the scriptlets use: units, sysusers/tmpfiles, the launcher, the config.
        for rel in ("usr/lib/systemd", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d", "etc/meshlet"):
            shutil.copytree(tree / rel, root / rel, dirs_exist_ok=True, symlinks=True)
        (root / "usr/bin/meshletd").write_bytes((tree / "usr/bin/meshletd").read_bytes())
        for tag, text in scripts.items():
            (root / "root" / tag.lower()).write_text(text)
        log("install", f"=== rpm scriptlets on {name}\n")
        host.ok("systemctl daemon-reload && sh /root/postin 1 && sh /root/posttrans")
        assert host.ok("id -nG meshlet").split() == ["meshlet"]
        assert re.search(rf"^meshlet:\d+:{SUBIDS}$", host.ok("cat /etc/subuid"), re.M)
        assert host.ok("stat -c %U /var/lib/meshlet-podman").strip() == "meshlet"
        assert host.ok("ls /var/lib/systemd/linger").split() == ["meshlet"]
        assert host.run("systemctl is-enabled meshletd").stdout.strip() == "disabled"
        # Upgrade: the new %post (2), then the old %preun (1) and %postun (1): nothing stops.
        host.ok("sh /root/postin 2 && sh /root/preun 1 && sh /root/postun 1")
        assert re.search(r"^meshlet:", host.ok("cat /etc/subuid"), re.M)
        assert host.ok("grep -c '^meshlet:' /etc/subuid").strip() == "1"  # no second range
        # Erase: %preun 0 stops meshletd and the slice; %postun 0 keeps data (no purge in rpm).
        host.ok("sh /root/preun 0 && sh /root/postun 0")
        assert host.run("test -d /var/lib/meshlet-podman").returncode == 0
    finally:
        sh(PACKAGE, "testhost", "down", name, timeout=120)
