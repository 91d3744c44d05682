//! taskflow-contracts: the task model and event schemas shared by the daemons.
