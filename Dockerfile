# The athanor binary (every role: worker, aggregator, gateway, migrate, up) in a slim
# image. Build: docker build -t athanor .
FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin athanor \
 && cp target/release/athanor /usr/local/bin/athanor

FROM debian:bookworm-slim
# python3 for command experiments such as the example (add your experiments' runtimes).
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /var/lib/athanor athanor
COPY --from=build /usr/local/bin/athanor /usr/local/bin/athanor
COPY examples /opt/athanor/examples
COPY clients/python/athanor.py /opt/athanor/clients/python/athanor.py
USER athanor
WORKDIR /var/lib/athanor
ENTRYPOINT ["athanor"]
CMD ["--help"]
