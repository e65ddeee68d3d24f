# fetcd's container image, for machines that can pull base images:
#
#   docker build -t fetcd .
#   docker run --rm -p 2379:2379 fetcd
#
# Machines without a registry (CI) build the same runtime image with ./scripts/docker-image.sh
# from the release binaries and the host's shared libraries (docker/Dockerfile.local).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# fetcd's protos build with a vendored protoc; the workspace's default members include the
# benchmark, whose etcd-client dependency needs a system protoc. Building the default members (as
# the README's start command does) is what makes the recorded optimisation profile match
# (pgo/README.md): another package selection changes dependencies' features and their symbols.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null \
    && cargo build --release --locked \
    && mkdir -p /out \
    && cp target/release/fetcd target/release/fetcd-health /out/

# glibc, libgcc_s and nothing else: what the binaries link against.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/fetcd /out/fetcd-health /usr/local/bin/
ENV ETCD_DATA_DIR=/var/lib/fetcd \
    ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \
    ETCD_LISTEN_PEER_URLS=http://0.0.0.0:2380
EXPOSE 2379 2380
HEALTHCHECK --interval=5s --timeout=4s --retries=5 \
    CMD ["/usr/local/bin/fetcd-health", "--endpoint", "http://127.0.0.1:2379", "--timeout", "3"]
ENTRYPOINT ["/usr/local/bin/fetcd"]
