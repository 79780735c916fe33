# capy-webhooks: one binary (aws-lc linked statically) on distroless, running as nonroot.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Cargo.toml, Cargo.lock, src/ (src/api/openapi.json is include_str!'d), benches/, crds/;
# .dockerignore keeps target/, .cluster/, .git/ and charts/ out.
COPY . .
RUN cargo build --release --locked && cp target/release/capy-webhooks /capy-webhooks

# libc and CA certificates, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /capy-webhooks /capy-webhooks
USER 65532:65532
EXPOSE 8080 8081 9090
ENTRYPOINT ["/capy-webhooks"]
CMD ["run"]
