# Build stage: compile the release binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY examples ./examples
RUN cargo build --release --locked --bin opscore

# Runtime stage: the binary alone, run as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home opscore
COPY --from=build /src/target/release/opscore /usr/local/bin/opscore
COPY config/workflows /etc/opscore/workflows
USER opscore
ENTRYPOINT ["opscore"]
CMD ["run"]
