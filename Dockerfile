# The athanor binary (every role: worker, aggregator, gateway, migrate, up) in a slim
# image. Build: docker build -t athanor .
FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin athanor \
 && cp target/release/athanor /usr/local/bin/athanor

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /var/lib/athanor athanor
COPY --from=build /usr/local/bin/athanor /usr/local/bin/athanor
USER athanor
WORKDIR /var/lib/athanor
ENTRYPOINT ["athanor"]
CMD ["--help"]
