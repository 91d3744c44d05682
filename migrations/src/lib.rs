//! taskflow-migrations
