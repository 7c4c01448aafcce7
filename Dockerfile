# beast: multi-stage build, small runtime image (deploy/README.md).
#   docker build -t beast .
#   docker run --rm -p 7878:7878 -p 9464:9464 beast
# Build stage: the release binaries (CPU backend; add --features cuda and a
# CUDA runtime base for the GPU backend, docs/CUDA.md).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin beast \
    && strip target/release/beast

# Runtime: Debian slim with the binary, the shipped models and a config.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/beast beast \
    && mkdir -p /var/lib/beast /etc/beast \
    && chown beast /var/lib/beast
COPY --from=build /src/target/release/beast /usr/local/bin/beast
COPY --from=build /src/models /opt/beast/models
COPY deploy/beast.toml /etc/beast/beast.toml
USER beast
WORKDIR /var/lib/beast
# 7878: requests (flatbuffers over TCP); 9464: admin (/metrics, /healthz, /readyz).
EXPOSE 7878 9464
# SIGTERM drains for drain_s (beast.toml) before stopping.
STOPSIGNAL SIGTERM
ENTRYPOINT ["beast", "serve", "--config", "/etc/beast/beast.toml"]
CMD ["--models", "/opt/beast/models"]
