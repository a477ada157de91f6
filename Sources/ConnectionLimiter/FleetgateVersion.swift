/// Fleetgate's version: what `fleetgate --version` prints and what every node registers in Redis. The one place it
/// is written.
public enum FleetgateVersion {
    /// The release this build is (semantic versioning; `-dev` between releases).
    public static let current = "0.2.0-dev"
}
