# syntax=docker/dockerfile:1
#
# dockerflow-sidecar: a release build in a Rust image, then only the binary
# in a distroless image (no shell, no package manager; glibc and CA
# certificates only), running as the non-root user 65532.
#
#   docker build \
#     --build-arg VERSION=1.4.0 \
#     --build-arg COMMIT=$(git rev-parse HEAD) \
#     --build-arg BUILD_URL=https://ci.example.com/builds/123 \
#     -t dockerflow-sidecar:1.4.0 .
#
# VERSION, COMMIT and BUILD_URL fill /usr/share/dockerflow-sidecar/version.json
# (the sidecar's own, Dockerflow's shape); COMMIT is also compiled in and
# exported as dockerflow_sidecar_build_info{commit}.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
ARG VERSION=dev
ARG COMMIT=unknown
ARG BUILD_URL=
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY examples ./examples
# The function layout (build.rs): what start-up, idle and the proxy path run
# sits together, so an idle sidecar maps less of its text.
COPY build.rs ./
COPY build ./build
ENV DOCKERFLOW_SIDECAR_COMMIT=${COMMIT}
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && mkdir -p /out/var/lib/dockerflow-sidecar \
    && cp target/release/dockerflow-sidecar /out/dockerflow-sidecar \
    && printf '{"source": "https://github.com/mozilla-services/dockerflow-sidecar", "version": "%s", "commit": "%s", "build": "%s"}\n' \
        "${VERSION}" "${COMMIT}" "${BUILD_URL}" > /out/version.json

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/dockerflow-sidecar /usr/local/bin/dockerflow-sidecar
COPY --from=build /out/version.json /usr/share/dockerflow-sidecar/version.json
COPY config/dockerflow-sidecar.toml /etc/dockerflow-sidecar/dockerflow-sidecar.toml
# The state file (reports, hook outbox) lives on a volume: mount an emptyDir
# here when the root filesystem is read-only.
COPY --from=build --chown=65532:65532 /out/var/lib/dockerflow-sidecar /var/lib/dockerflow-sidecar
ENV DOCKERFLOW_CONFIG=/etc/dockerflow-sidecar/dockerflow-sidecar.toml \
    DOCKERFLOW_STATE__PATH=/var/lib/dockerflow-sidecar/state.db
USER 65532:65532
EXPOSE 8000 9102
ENTRYPOINT ["/usr/local/bin/dockerflow-sidecar"]
CMD ["serve"]
