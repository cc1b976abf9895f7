# syntax=docker/dockerfile:1
# tollgate's container image. docs/deploy.md explains each choice;
# tests/deploy_files.rs checks this file against the binary's defaults and
# against .ci/run, since CI cannot pull the base images to build it.

# The build: deploy/release/build.sh, the cargo command .ci/run runs, in
# release (fat LTO, as Cargo.toml's release profile says), with the
# machine code then laid out by BOLT for the traffic of
# benches/workload.rs (Debian's bolt-19). The full Rust image, since
# jemalloc's build needs make. Registry and target are cache mounts, so a
# rebuild recompiles only what changed.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends bolt-19 libbolt-19-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    deploy/release/build.sh \
 && install -D target/release-bolt/tollgate /out/usr/local/bin/tollgate \
 && install -d /out/var/lib/tollgate

# The runtime: glibc, libgcc and CA certificates (the TLS client reads the
# system's roots), no shell, no package manager; the health check is the
# binary's own. Debian 12, as the build, so the glibc versions agree.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/tollgate /usr/local/bin/tollgate
# The default config: simulated backends, so the image runs with nothing
# else. Mount a directory over /etc/tollgate (a ConfigMap, a bind mount)
# to replace it: the gateway watches the directory and reloads on change.
COPY config/tollgate.toml /etc/tollgate/tollgate.toml
# The ledger: the default config's relative data_dir ("data") lands in this
# volume. Owned by the runtime user, so a fresh named volume is writable.
COPY --from=build --chown=65532:65532 /out/var/lib/tollgate /var/lib/tollgate
WORKDIR /var/lib/tollgate
VOLUME /var/lib/tollgate
# distroless's "nonroot", numeric so Kubernetes' runAsNonRoot can check it.
USER 65532:65532
EXPOSE 8080
# SIGTERM drains: requests in flight get server.shutdown_grace_ms (30 s by
# default). `docker stop` waits 10 s unless given --stop-timeout; compose
# and Kubernetes set their own, longer.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/tollgate", "healthcheck", "--listen", "0.0.0.0:8080"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
# 0.0.0.0: a container's loopback is its own. The image's port wins over
# server.listen in a mounted config.
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml", "--listen", "0.0.0.0:8080"]
