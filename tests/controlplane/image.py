#!/usr/bin/env python3
"""Assemble a container image without Docker, from the same Dockerfile users build.

    image.py DOCKERFILE BINARY NAME:TAG OUT.tar

Reads the Dockerfile's last stage (the runtime image) and writes an OCI image-layout
tarball that `ctr images import` takes: the release binary at the path the Dockerfile's
`COPY --from=build` puts it, what a distroless `cc` base provides (the binary's shared
libraries, CA certificates, the nonroot user), and the stage's USER, ENTRYPOINT, CMD,
EXPOSE and LABELs in the image configuration. A directive of that stage this script does
not know fails the build, so the Dockerfile and the image built here cannot drift apart
silently. `--print-config` prints the configuration instead (for the test that compares).
"""
import hashlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile

KNOWN = {"FROM", "ARG", "LABEL", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}


def stage(dockerfile):
    """Directives of the last stage, continuation lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in open(dockerfile):
        line = raw.rstrip("\n")
        if line.lstrip().startswith("#") and not cur:
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    last = max(i for i, l in enumerate(lines) if l.split()[0].upper() == "FROM")
    return lines[last:]


def config_of(dockerfile):
    args, cfg, copies = {}, {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                             "Labels": {}}, []
    for line in stage(dockerfile):
        word, rest = line.split(None, 1) if " " in line else (line, "")
        word = word.upper()
        if word not in KNOWN:
            sys.exit(f"image.py: {dockerfile}: the runtime stage uses {word}, which this script does not build")
        if word == "FROM":
            if "distroless/cc" not in rest:
                sys.exit(f"image.py: {dockerfile}: base {rest!r} is not distroless/cc, which this script reproduces")
            cfg["User"] = "65532" if rest.split()[0].endswith(":nonroot") else "0"
        elif word == "ARG":
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif word == "LABEL":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                for a, av in args.items():
                    v = v.replace("$" + a, av).replace("${" + a + "}", av)
                cfg["Labels"][k] = v
        elif word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copies.append((parts[0], parts[1]))
        elif word == "USER":
            cfg["User"] = rest.strip()
        elif word == "EXPOSE":
            cfg.setdefault("ExposedPorts", {}).update({p if "/" in p else p + "/tcp": {} for p in rest.split()})
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)
            cfg["Entrypoint" if word == "ENTRYPOINT" else "Cmd"] = value
    if len(copies) != 1:
        sys.exit(f"image.py: {dockerfile}: expected one COPY of the release binary, found {len(copies)}")
    return cfg, copies[0][1]


def shared_libraries(binary):
    run = subprocess.run(["ldd", binary], capture_output=True, text=True)
    out = run.stdout
    if "not found" in out:
        sys.exit(f"image.py: {binary} needs libraries this machine does not have:\n{out}")
    if run.returncode != 0 and "not a dynamic executable" not in run.stdout + run.stderr:
        sys.exit(f"image.py: ldd {binary} failed: {run.stderr}")
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def build(dockerfile, binary, ref, out):
    cfg, dest = config_of(dockerfile)
    # Debug info is for the build machine: the image gets a stripped copy.
    stripped = out + ".bin"
    subprocess.run(["strip", "-o", stripped, binary], check=True)
    files = [(stripped, dest, 0o755)]
    for lib in shared_libraries(binary):
        files.append((os.path.realpath(lib), lib, 0o755))
    files.append(("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt", 0o644))
    write(cfg, files, ref, out)
    os.unlink(stripped)


def write(cfg, files, ref, out):
    passwd = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
    group = b"root:x:0:\nnonroot:x:65532:\n"
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as lt:
        made = set()

        def dirs(path, mode=0o755):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                p = "/".join(parts[:i])
                if p and p not in made:
                    made.add(p)
                    ti = tarfile.TarInfo(p)
                    ti.type, ti.mode = tarfile.DIRTYPE, (0o1777 if p == "tmp" else mode)
                    if p == "home/nonroot":
                        ti.uid = ti.gid = 65532  # the nonroot user's own home, as in distroless
                    lt.addfile(ti)

        for d in ("tmp", "proc", "sys", "dev", "etc", "home/nonroot"):
            dirs(d)
        for src, dst, mode in files:
            dirs(os.path.dirname(dst))
            ti = tarfile.TarInfo(dst.lstrip("/"))
            data = open(src, "rb").read()
            ti.size, ti.mode = len(data), mode
            lt.addfile(ti, io.BytesIO(data))
        for name, data in (("etc/passwd", passwd), ("etc/group", group)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            lt.addfile(ti, io.BytesIO(data))
    raw = layer.getvalue()

    def blob(tf, data, media):
        digest = hashlib.sha256(data).hexdigest()
        ti = tarfile.TarInfo(f"blobs/sha256/{digest}")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    with tarfile.open(out, "w") as tf:
        layer_desc = blob(tf, raw, "application/vnd.oci.image.layer.v1.tar")
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        image_cfg = {"architecture": arch, "os": "linux", "config": cfg,
                     "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}
        c = blob(tf, json.dumps(image_cfg, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": c, "layers": [layer_desc]}
        m = blob(tf, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
        m["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("index.json", json.dumps({"schemaVersion": 2, "manifests": [m]}).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--pause":
        # The pod sandbox image: a static pause binary, nothing else.
        write({"Entrypoint": ["/pause"], "User": "65535"}, [(sys.argv[2], "/pause", 0o755)], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 3 and sys.argv[1] == "--print-config":
        print(json.dumps(config_of(sys.argv[2])[0], sort_keys=True))
    elif len(sys.argv) == 5:
        build(*sys.argv[1:])
    else:
        sys.exit(__doc__)
