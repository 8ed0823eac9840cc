import { Link } from "react-router-dom";

export function NotFound() {
  return (
    <div className="empty-state">
      <title>Not found · edgefleet</title>
      <p>There is no page here.</p>
      <p>
        <Link to="/">Go to the device list</Link>
      </p>
    </div>
  );
}
