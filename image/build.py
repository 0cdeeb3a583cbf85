#!/usr/bin/env python3
"""./dev image: build kproxy's container image offline and reproducibly.

1. The base. mmdebstrap makes a Debian 12 root filesystem from Debian's
   packages: the essential set plus image/debian.in, without Recommends,
   documentation or locales, with merged /usr. It becomes a local image,
   ``localhost/kproxy-base:<key>`` (image/base.Dockerfile), the key being a hash
   of everything that shapes it. The tarball is kept in dist/base/ and reused
   while the key is the same; ``--refresh-base`` makes it again (to pick up
   Debian's latest security updates). Its package versions are compared with
   image/debian.lock: a difference is reported (``--locked`` makes it an error,
   ``--update-lock`` rewrites the file).
2. The wheels. A build virtualenv gets image/build.lock (hatchling, pip;
   hash-checked); it builds kproxy's wheel (no build isolation, so the pinned
   hatchling) and downloads the wheels of image/requirements.lock,
   hash-checked, binary only, for the base's CPython and glibc, into
   dist/wheels/ with pip's own wheel and kproxy.txt (kproxy's wheel and its hash).
3. The image. ``podman build`` of the Dockerfile with chroot isolation, inside a
   network namespace of its own (the build has no network at all), every
   timestamp set to SOURCE_DATE_EPOCH. Tagged ``kproxy:<version>`` and
   ``ghcr.io/kproxy/kproxy:<version>``, the name daemonset.yaml runs.
4. The outputs, in dist/: ``kproxy-<version>.oci.tar`` (``podman save --format
   oci-archive``), ``kproxy-<version>.sbom.txt`` (``pip list`` and ``dpkg -l`` of
   the image) and ``kproxy-<version>.json``, the build record.

When the build record matches the inputs (a hash of the Dockerfile, image/,
pyproject.toml, README.md, kproxy/ and rules/) and podman still has that
image (or can load it back from the archive), nothing is built again; ``--force``
rebuilds. SOURCE_DATE_EPOCH defaults to the time of the last commit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import venv
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "image"
DIST = ROOT / "dist"
REPOSITORY = "ghcr.io/kproxy/kproxy"
"""The name daemonset.yaml pulls; the image is also tagged kproxy:<version>."""
SUITE = "bookworm"
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
"""No systemd here, and cgroups cannot be managed: chroot isolation with cgroupfs."""
MMDEBSTRAP_OPTIONS = [
    "--variant=essential",
    "--aptopt=APT::Install-Recommends \"false\"",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
    # mmdebstrap copies the host's; a container gets both from its runtime.
    "--customize-hook=rm -f \"$1/etc/resolv.conf\" \"$1/etc/hostname\"",
]
STRIP = ["./dev/?*"]
"""Left out of the base: device nodes (a container runtime mounts its own /dev; a rootless
podman could not create them when it pulls the image)."""
FALLBACK_EPOCH = 1700000000
"""SOURCE_DATE_EPOCH outside a git checkout."""


PIP_SETTINGS_KEPT = ("PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST",
                     "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")
"""How this machine reaches PyPI; its other pip settings (extra indexes, find-links, constraints) are ignored."""


def pip_env(**extra: str) -> dict[str, str]:
    """The environment for pip and pip-compile: no pip configuration file, only PIP_SETTINGS_KEPT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in PIP_SETTINGS_KEPT}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, capture: bool = False, **kwargs) -> str:
    """Run a command; its output goes to stderr unless captured. Raises on failure."""
    result = subprocess.run(list(argv), check=False, text=True,
                            stdout=subprocess.PIPE if capture else sys.stderr,
                            stderr=subprocess.PIPE if capture else None, **kwargs)
    if result.returncode != 0:
        detail = f"\n{result.stderr.strip()}" if capture and result.stderr else ""
        raise SystemExit(f"image: failed ({result.returncode}): {' '.join(argv)}{detail}")
    return result.stdout if capture else ""


def version() -> str:
    """kproxy's version: pyproject.toml's, which must be kproxy.__version__ too."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / "kproxy" / "__init__.py").read_text(), re.M)
    if not match or match.group(1) != declared:
        raise SystemExit(f"image: pyproject.toml says {declared}, kproxy/__init__.py {match and match.group(1)}")
    return declared


def source_date_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True)
        return int(out.stdout.strip())
    except (OSError, ValueError):
        return FALLBACK_EPOCH


def input_files() -> list[Path]:
    """Everything the image is made from, in the repository."""
    files = [ROOT / name for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")]
    for directory in ("image", "kproxy", "rules"):
        files += [p for p in (ROOT / directory).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted(files)


def inputs_hash() -> str:
    """A hash of the image's inputs: a build record with another hash is stale."""
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(f"{path.relative_to(ROOT)}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def debian_packages() -> list[str]:
    """image/debian.in: one package a line, # comments."""
    lines = (IMAGE / "debian.in").read_text().splitlines()
    return [word for line in lines if (word := line.split("#", 1)[0].strip())]


def mirrors() -> list[str]:
    """KPROXY_DEBIAN_MIRROR (space-separated mirror URIs or sources lines), else mmdebstrap's default."""
    value = os.environ.get("KPROXY_DEBIAN_MIRROR", "").strip()
    return [m for m in value.split("\n") if m.strip()] if "deb " in value else value.split()


def base_key() -> str:
    """What shapes the base: the packages, mmdebstrap's options, the suite and the mirrors."""
    text = json.dumps([SUITE, debian_packages(), MMDEBSTRAP_OPTIONS, STRIP, mirrors(), platform.machine()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- 1. the base ---------------------------------------------------------------------------------


def make_base(epoch: int, refresh: bool) -> tuple[str, dict[str, str]]:
    """The base image (made or reused) and its package versions."""
    key = base_key()
    directory = DIST / "base" / key
    tarball = directory / "rootfs.tar"
    if refresh or not tarball.exists():
        shutil.rmtree(DIST / "base", ignore_errors=True)
        directory.mkdir(parents=True)
        log(f"mmdebstrap: Debian {SUITE} ({', '.join(debian_packages())} and the essential set)")
        started = time.monotonic()
        run(["mmdebstrap", "--quiet", *MMDEBSTRAP_OPTIONS, f"--include={','.join(debian_packages())}",
             "--format=tar", SUITE, str(tarball) + ".part", *mirrors()],
            env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)})
        run(["tar", "--delete", "--wildcards", "-f", str(tarball) + ".part", *STRIP])
        os.replace(str(tarball) + ".part", tarball)
        log(f"mmdebstrap: done in {time.monotonic() - started:.0f} s")
    else:
        log(f"base: reusing {tarball.relative_to(ROOT)} (--refresh-base makes it again)")
    name = f"localhost/kproxy-base:{key}"
    # --timestamp sets every file's time too: the same packages give the same image ID, whenever made.
    run([*PODMAN, "build", "--quiet", "--isolation=chroot", "--pull=never", "--layers=false",
         f"--timestamp={epoch}", "-t", name, "-f", str(IMAGE / "base.Dockerfile"), str(directory)], capture=True)
    remove_other_bases(name)
    return name, packages_in_tarball(tarball)


def remove_other_bases(keep: str) -> None:
    """Untag older kproxy-base images (an image still in use stays)."""
    listed = run([*PODMAN, "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/kproxy-base"], capture=True)
    for name in listed.split():
        if name != keep:
            subprocess.run([*PODMAN, "image", "rm", name], capture_output=True)


def packages_in_tarball(tarball: Path) -> dict[str, str]:
    """{package: version} of the installed packages, from the tarball's dpkg status file."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("./var/lib/dpkg/status")
        assert member is not None
        status = member.read().decode()
    return parse_dpkg_status(status)


def parse_dpkg_status(status: str) -> dict[str, str]:
    packages = {}
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = fields["Version"]
    return dict(sorted(packages.items()))


def read_debian_lock() -> dict[str, str]:
    path = IMAGE / "debian.lock"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def write_debian_lock(packages: dict[str, str]) -> None:
    header = ("# Every package of the image's Debian base, as the last `./dev image --update-lock` built it\n"
              f"# (Debian {SUITE}, image/debian.in). ./dev image reports any difference.\n")
    (IMAGE / "debian.lock").write_text(header + "".join(f"{p}={v}\n" for p, v in packages.items()))


def debian_drift(packages: dict[str, str]) -> list[str]:
    """The differences between the base and image/debian.lock, one line each."""
    locked = read_debian_lock()
    drift = []
    for name in sorted(set(locked) | set(packages)):
        if locked.get(name) != packages.get(name):
            drift.append(f"{name}: {locked.get(name, '(absent)')} in image/debian.lock, "
                         f"{packages.get(name, '(absent)')} in the base")
    return drift


# -- 2. the wheels -------------------------------------------------------------------------------


def build_venv() -> Path:
    """dist/build-venv with image/build.lock installed (hash-checked); reused while the lock is the same."""
    path = DIST / "build-venv"
    stamp = path / f".stamp-{hashlib.sha256((IMAGE / 'build.lock').read_bytes()).hexdigest()[:16]}"
    if not stamp.exists():
        log("build venv: hatchling and pip from image/build.lock")
        venv.create(path, with_pip=True, clear=True)
        run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--require-hashes", "--only-binary=:all:", "-r", str(IMAGE / "build.lock")], env=pip_env())
        stamp.touch()
    return path / "bin" / "python"


def wheel_target(packages: dict[str, str]) -> list[str]:
    """pip's options that select wheels for the base's CPython and glibc, whatever the host runs."""
    python = re.match(r"(\d+)\.(\d+)", packages["python3"])
    glibc = re.match(r"2\.(\d+)", packages["libc6"])
    assert python and glibc, (packages["python3"], packages["libc6"])
    major, minor = python.groups()
    arch = platform.machine()
    platforms = []
    for glibc_minor in range(int(glibc.group(1)), 4, -1):
        platforms.append(f"manylinux_2_{glibc_minor}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(glibc_minor)
        if legacy:
            platforms.append(f"{legacy}_{arch}")
    options = ["--implementation=cp", f"--python-version={major}.{minor}",
               f"--abi=cp{major}{minor}", "--abi=abi3", "--abi=none"]
    return options + [f"--platform={p}" for p in platforms]


def make_wheels(python: Path, packages: dict[str, str], epoch: int) -> Path:
    """dist/wheels/: kproxy's wheel (and kproxy.txt), the locked wheels, pip's wheel."""
    wheels = DIST / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    log("wheels: kproxy (hatchling from image/build.lock)")
    build_dir = DIST / "wheel-build"
    shutil.rmtree(build_dir, ignore_errors=True)
    run([str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(build_dir), str(ROOT)], env=pip_env(SOURCE_DATE_EPOCH=str(epoch)))
    (wheel,) = build_dir.glob("kproxy-*.whl")
    shutil.move(wheel, wheels / wheel.name)
    build_dir.rmdir()
    digest = hashlib.sha256((wheels / wheel.name).read_bytes()).hexdigest()
    (wheels / "kproxy.txt").write_text(f"kproxy=={version()} --hash=sha256:{digest}\n")
    log("wheels: image/requirements.lock, hash-checked")
    run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
         *wheel_target(packages), "-d", str(wheels), "-r", str(IMAGE / "requirements.lock")], env=pip_env())
    pip_wheel = locked_pip_wheel(python)
    shutil.copy(pip_wheel, wheels / pip_wheel.name)
    return wheels


def locked_pip_wheel(python: Path) -> Path:
    """pip's wheel, the version of image/build.lock, hash-checked."""
    cache = DIST / "pip-wheel"
    shutil.rmtree(cache, ignore_errors=True)
    block = re.search(r"^pip==\S+(?: \\\n\s+--hash=\S+)+", (IMAGE / "build.lock").read_text(), re.M)
    if not block:
        raise SystemExit("image: image/build.lock pins no pip (run ./dev lock)")
    requirement = cache / "pip.txt"
    cache.mkdir(parents=True)
    requirement.write_text(block.group(0) + "\n")
    run([str(python), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "-d", str(cache), "-r", str(requirement)], env=pip_env())
    (found,) = cache.glob("pip-*.whl")
    return found


# -- 3. the image --------------------------------------------------------------------------------


def image_id(ref: str) -> str | None:
    result = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Id}}", ref],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def build_image(base: str, epoch: int, tags: list[str]) -> str:
    """podman build of the Dockerfile in an empty network namespace; returns the image ID."""
    previous = image_id(tags[0])
    log(f"podman build (offline: a network namespace of its own), FROM {base}")
    argv = ["unshare", "--net", "--", *PODMAN, "build", "--isolation=chroot", "--pull=never", "--layers=false",
            f"--timestamp={epoch}", f"--build-arg=BASE={base}", f"--build-arg=SOURCE_DATE_EPOCH={epoch}",
            f"--build-arg=VERSION={version()}", "-f", str(ROOT / "Dockerfile")]
    for tag in tags:
        argv += ["-t", tag]
    run([*argv, str(ROOT)])
    new = image_id(tags[0])
    assert new, tags[0]
    if previous and previous != new:
        # The image these tags named before, untagged now: remove it (it may still be in use; then keep it).
        subprocess.run([*PODMAN, "image", "rm", previous], capture_output=True)
    return new


def save_archive(ref: str, archive: Path, epoch: int) -> None:
    """``podman save`` as an OCI layout, packed into a tar with fixed order, owners and times.

    (``podman save --format oci-archive`` stamps the tar entries with the time of
    the save; the blobs inside are the same every time.)
    """
    log(f"podman save: {archive.relative_to(ROOT)}")
    layout = DIST / "oci-layout"
    shutil.rmtree(layout, ignore_errors=True)
    run([*PODMAN, "save", "--quiet", "--format=oci-dir", "-o", str(layout), ref])
    part = archive.with_suffix(".part")
    with tarfile.open(part, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(layout)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    os.replace(part, archive)
    shutil.rmtree(layout)


def manifest_digest(archive: Path) -> str:
    """The digest of the image's manifest in the archive: what a registry reports after a push of it."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        (manifest,) = json.load(member)["manifests"]
    return manifest["digest"]


@contextlib.contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """The image's root filesystem, mounted read-only while in the block."""
    path = Path(run([*PODMAN, "image", "mount", ref], capture=True).strip())
    try:
        yield path
    finally:
        subprocess.run([*PODMAN, "image", "unmount", ref], capture_output=True)


def sbom(ref: str, python: Path, record: dict) -> str:
    """The image's package list: pip list of /opt/kproxy and dpkg -l."""
    with mounted(ref) as rootfs:
        (site,) = rootfs.glob("opt/kproxy/lib/python3*/site-packages")
        pip_list = run([str(python), "-m", "pip", "list", "--path", str(site)], capture=True, env=pip_env())
        dpkg_list = run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-l"], capture=True,
                        env={**os.environ, "COLUMNS": "160"})
    head = [f"# kproxy {record['version']} image: {', '.join(record['tags'])}",
            f"# image ID {record['image_id']}, {record['size_bytes'] / 1e6:.1f} MB, digest {record['digest']}",
            f"# built from inputs {record['inputs']} with SOURCE_DATE_EPOCH={record['source_date_epoch']}",
            f"# base {record['base']}"]
    if record["debian_drift"]:
        head.append("# Debian packages that differ from image/debian.lock:")
        head += [f"#   {line}" for line in record["debian_drift"]]
    return "\n".join(head) + "\n\n## pip list (/opt/kproxy)\n" + pip_list + "\n## dpkg -l\n" + dpkg_list


def image_size(ref: str) -> int:
    return int(run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", ref], capture=True).strip())


# -- the command ---------------------------------------------------------------------------------


def outputs(ver: str) -> tuple[Path, Path, Path]:
    stem = DIST / f"kproxy-{ver}"
    return Path(f"{stem}.oci.tar"), Path(f"{stem}.sbom.txt"), Path(f"{stem}.json")


def current_record(ver: str, inputs: str) -> dict | None:
    """The build record, if it is for these inputs and podman has (or can load back) its image."""
    archive, sbom_path, record_path = outputs(ver)
    if not (archive.exists() and sbom_path.exists() and record_path.exists()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("inputs") != inputs:
        return None
    if all(image_id(tag) == record["image_id"] for tag in record["tags"]):
        return record
    log(f"loading {archive.relative_to(ROOT)} back into podman")
    subprocess.run([*PODMAN, "load", "--quiet", "-i", str(archive)], capture_output=True)
    for tag in record["tags"]:
        subprocess.run([*PODMAN, "tag", record["image_id"], tag], capture_output=True)
    return record if all(image_id(tag) == record["image_id"] for tag in record["tags"]) else None


def report(record: dict, sbom_path: Path, archive: Path) -> None:
    print(sbom_path.read_text(), end="")
    print(f"\nkproxy {record['version']}: {', '.join(record['tags'])}")
    print(f"  image ID     {record['image_id']}")
    print(f"  digest       {record['digest']} (pushed as it is, the registry reports this one)")
    print(f"  image size   {record['size_bytes'] / 1e6:.1f} MB (uncompressed)")
    print(f"  OCI archive  {archive.relative_to(ROOT)} ({archive.stat().st_size / 1e6:.1f} MB)")
    print(f"  SBOM         {sbom_path.relative_to(ROOT)}")
    if record["debian_drift"]:
        print(f"  note: {len(record['debian_drift'])} Debian packages differ from image/debian.lock "
              "(listed at the top of the SBOM; ./dev image --update-lock records them)")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="./dev image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build even if dist/ holds an image of these inputs")
    parser.add_argument("--refresh-base", action="store_true", help="make the Debian base again (implies --force)")
    parser.add_argument("--locked", action="store_true", help="fail if the base's packages differ from image/debian.lock")
    parser.add_argument("--update-lock", action="store_true", help="write the base's packages to image/debian.lock")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("image: needs root (mmdebstrap, podman, network namespaces)")
    ver = version()
    archive, sbom_path, record_path = outputs(ver)
    inputs = inputs_hash()
    if not (args.force or args.refresh_base or args.update_lock or args.locked):
        record = current_record(ver, inputs)
        if record:
            log(f"up to date: {record_path.relative_to(ROOT)} is for these inputs (--force rebuilds)")
            report(record, sbom_path, archive)
            return 0
    started = time.monotonic()
    epoch = source_date_epoch()
    DIST.mkdir(exist_ok=True)
    base, packages = make_base(epoch, args.refresh_base)
    if args.update_lock:
        write_debian_lock(packages)
        # image/debian.lock is an input: the record must name the inputs after the update.
        inputs = inputs_hash()
    drift = debian_drift(packages)
    if drift:
        log(f"{len(drift)} Debian packages differ from image/debian.lock:\n  " + "\n  ".join(drift))
        if args.locked:
            raise SystemExit("image: --locked: the base differs from image/debian.lock")
    python = build_venv()
    make_wheels(python, packages, epoch)
    tags = [f"{REPOSITORY}:{ver}", f"localhost/kproxy:{ver}"]
    image = build_image(base, epoch, tags)
    save_archive(tags[0], archive, epoch)
    record = {"version": ver, "tags": tags, "image_id": image, "digest": manifest_digest(archive),
              "size_bytes": image_size(tags[0]),
              "inputs": inputs, "source_date_epoch": epoch, "base": base, "debian_drift": drift,
              "archive": archive.name}
    sbom_path.write_text(sbom(tags[0], python, record))
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"built in {time.monotonic() - started:.0f} s")
    report(record, sbom_path, archive)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
