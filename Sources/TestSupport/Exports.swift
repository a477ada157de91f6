@_exported import ChildProcesses
@_exported import LocalFleet

/// The errors of the processes TestSupport starts (the name tests have always used).
public typealias TestSupportError = LocalFleetError
