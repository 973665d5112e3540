# The kuwa image for people with Docker. The tested path is `cargo xtask
# image` (an OCI layout written without Docker, inspected in CI); this builds
# the same contents: a static kuwa (musl) and the shipped plugins, FROM
# scratch, as user 65532. Not built in CI (docs/operations.md).
#
#   docker build -t kuwa:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl wasm32-wasip2
WORKDIR /src
COPY . .
ENV CARGO_TARGET_DIR=/src/target CC_x86_64_unknown_linux_musl=musl-gcc
RUN cargo xtask plugins \
 && cargo build --release --locked --target x86_64-unknown-linux-musl -p kuwa-host --bin kuwa \
 && mkdir -p /out/plugins /out/tmp /out/var/cache/kuwa \
 && cp target/x86_64-unknown-linux-musl/release/kuwa /out/kuwa \
 && cp target/plugins/*.wasm target/plugins/*.yaml /out/plugins/ \
 && chmod 1777 /out/tmp && chown 65532:65532 /out/var/cache/kuwa && chmod 700 /out/var/cache/kuwa

FROM scratch
COPY --from=build /out/ /
USER 65532:65532
ENV KUWA_COMPILE_CACHE=/var/cache/kuwa/compiled
EXPOSE 9464
ENTRYPOINT ["/kuwa"]
CMD ["run", "--plugins", "/plugins"]
